"""The ImageNet transforms against torchvision 0.29.1's, to the pixel, from reference outputs made once with it
(tests/fixtures/imagenet_transforms/, written by scripts/make_transform_fixture.py; torchvision is not needed here)."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from lra_soft.imagenet.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomHorizontalFlip, RandomResizedCrop,
                                          ResizeCenterCrop, ToNormalizedTensor, center_crop_box, eval_resize,
                                          eval_transform, resize_size, train_transform)

FIXTURE = Path(__file__).parent / "fixtures" / "imagenet_transforms"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
SAME_PILLOW = PIL.__version__.split(".")[0] == REFERENCE["made_with"]["pillow"].split(".")[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(name: str) -> Image.Image:
    with Image.open(FIXTURE / name) as img:
        return img.convert("RGB")


def test_eval_resize_and_crop_geometry_equal_torchvision():
    """660 (size, crop) cases: the long side truncated, the crop offset rounded half to even, as torchvision's
    Resize(int) + CenterCrop (and timm's evaluation transform, checked when the fixture was made)."""
    rows = REFERENCE["eval_geometry"]
    assert len(rows) == 660 and REFERENCE["mean"] == list(IMAGENET_MEAN) and REFERENCE["std"] == list(IMAGENET_STD)
    assert {(r[2], r[3]) for r in rows} == {(224, eval_resize(224, 0.875)), (224, eval_resize(224, 0.9))}
    for w, h, size, short, ow, oh, left, top in rows:
        assert resize_size(w, h, short) == (ow, oh), (w, h, short)
        assert center_crop_box(ow, oh, size) == (left, top, left + size, top + size), (w, h, short)
    # the two cases that moved pixels before: 640 x 427 resizes to 383 (not 384) x 256; 341 - 224 = 117 -> offset 58
    assert resize_size(640, 427, 256) == (383, 256) and center_crop_box(341, 256, 224)[0] == 58


@pytest.mark.skipif(not SAME_PILLOW, reason=f"the pixel references were made with Pillow "
                                            f"{REFERENCE['made_with']['pillow']}, whose resampling may differ")
def test_eval_transform_pixels_equal_torchvision():
    for case in REFERENCE["eval_pixels"]:
        img = image(case["image"])
        crop = ResizeCenterCrop(case["size"], case["crop_pct"])(img)
        assert sha256(crop.tobytes()) == case["uint8_sha256"], case
        tensor = eval_transform(case["size"], case["crop_pct"])(img)
        assert tensor.dtype == torch.float32 and tensor.shape == (3, case["size"], case["size"])
        assert sha256(tensor.contiguous().numpy().tobytes()) == case["tensor_sha256"], case


def test_random_resized_crop_draws_equal_torchvision():
    """Seeded: the same boxes (with the fallback of extreme aspect ratios) and flips as torchvision's."""
    crop = RandomResizedCrop(16)
    for w, h, seed, top, left, bh, bw in REFERENCE["train_geometry"]:
        torch.manual_seed(seed)
        assert crop.box(w, h) == (left, top, left + bw, top + bh), (w, h, seed)
    for case in REFERENCE["train"]:
        img = image(case["image"])
        torch.manual_seed(case["seed"])
        top, left, bh, bw = case["box"]
        assert crop.box(*img.size) == (left, top, left + bw, top + bh)
        assert (torch.rand(1).item() < 0.5) == case["flip"]


@pytest.mark.skipif(not SAME_PILLOW, reason=f"the pixel references were made with Pillow "
                                            f"{REFERENCE['made_with']['pillow']}, whose resampling may differ")
def test_train_crop_and_flip_pixels_equal_torchvision():
    crop, flip = RandomResizedCrop(16), RandomHorizontalFlip()
    for case in REFERENCE["train"]:
        torch.manual_seed(case["seed"])
        assert sha256(flip(crop(image(case["image"]))).tobytes()) == case["uint8_sha256"], case


def test_transforms_compose_to_normalised_tensors():
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out = eval_transform(14)(img)  # short side 14 / 0.875 = 16: 24 x 16, crop offset (5, 1)
    resized = np.asarray(img.resize((24, 16), Image.BICUBIC), dtype=np.float32) / 255
    want = (torch.from_numpy(resized[1:15, 5:19]).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, want)
    assert ResizeCenterCrop(224).resize == 256 and ResizeCenterCrop(224, 0.9).resize == math.floor(224 / 0.9) == 248
    assert train_transform(8)(Image.new("RGB", (50, 30))).shape == (3, 8, 8)
    assert ToNormalizedTensor()(Image.new("RGB", (3, 2), (255, 0, 0))).shape == (3, 2, 3)


def test_bad_crop_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        eval_transform(224, 1.2)
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop_box(200, 300, 224)
