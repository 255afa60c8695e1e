"""ImageNet data path: ImageFolder, mixup/CutMix and label smoothing against torch references (the transforms:
test_imagenet_transforms.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lra_soft.imagenet.augment import MixupCutmix, smooth_one_hot, soft_target_cross_entropy
from lra_soft.imagenet.data import ImageFolder
from lra_soft.imagenet.transforms import eval_transform


def _folder(root, classes=("b", "a"), per_class=2, size=(30, 20)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_labels_and_errors(tmp_path):
    train = ImageFolder(_folder(tmp_path / "train"), eval_transform(16))
    assert train.classes == ["a", "b"] and len(train) == 4
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    assert len(ImageFolder(tmp_path / "train", eval_transform(16))) == 4
    _folder(tmp_path / "val", classes=("a", "c"))
    with pytest.raises(ValueError, match="training split lacks"):
        ImageFolder(tmp_path / "val", eval_transform(16), classes=train.classes)
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        ImageFolder(tmp_path / "missing", eval_transform(16))
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", eval_transform(16))


def test_label_smoothing_matches_torch():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = smooth_one_hot(y, 5, 0.1)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), F.cross_entropy(logits, y,
                                                                                          label_smoothing=0.1))


def test_mixup_mixes_images_and_targets_with_one_lam():
    mix = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.0)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    xm, t = mix(x, y)
    lam = t[0, 0].item()  # sample 0 keeps lam of class 0 and gets 1 - lam of sample 2's class 2
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0], torch.tensor([lam, 0.0, 1 - lam, 0.0]))


def test_cutmix_lam_is_the_kept_area():
    mix = MixupCutmix(2, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    x = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    for _ in range(20):
        xm, t = mix(x, torch.tensor([0, 1]))
        kept = (xm[0] == 0).float().mean().item()  # fraction of sample 0 still its own pixels
        torch.testing.assert_close(t[0, 0], torch.tensor(kept))
        torch.testing.assert_close(t.sum(-1), torch.ones(2))


def test_mixing_off_gives_smoothed_targets():
    mix = MixupCutmix(3, prob=0.0)
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([2, 0])
    xm, t = mix(x, y)
    assert xm is x
    torch.testing.assert_close(t, smooth_one_hot(y, 3, 0.1))
    with pytest.raises(ValueError, match="alphas"):
        MixupCutmix(3, mixup_alpha=-1)
