"""Where timm imports: the real timm registration, the authors' recipe built by timm, and our hand-written pieces
(label smoothing, mixup, CutMix, soft-target loss, schedule, EMA, accuracy) against timm's.

timm needs a torchvision built for the installed torch, so these tests skip where it cannot be imported (as beside
the torch 2.13.0 CPU build); they run with e.g. torch 2.14.1 + torchvision 0.29.1 + timm 1.0.
"""
import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image


def _import_timm():
    try:
        import timm
        import timm.data  # noqa: F401  (imports torchvision)
        return timm, None
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch build
        return None, f"timm cannot be imported here ({e.__class__.__name__}: {str(e)[:120]})"


timm, WHY = _import_timm()
pytestmark = pytest.mark.skipif(timm is None, reason=WHY or "")


def test_real_timm_registration():
    import lra_soft.vision.timm_models  # noqa: F401  (the opt-in: registers the five backbones)

    assert timm.list_models("soft_*") == ["soft_huge", "soft_large", "soft_medium", "soft_small", "soft_tiny"]
    model = timm.create_model("soft_tiny", num_classes=10, drop_path_rate=0.0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("soft_tiny", pretrained=True)


def test_authors_transform_is_timms_with_their_strings():
    from torchvision import transforms as T
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from lra_soft.imagenet.recipes import RECIPES, build_train_transform

    transform = build_train_transform(RECIPES["authors"], 32)
    steps = transform.transforms
    names = [type(t).__name__ for t in steps]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    rand = next(t for t in steps if isinstance(t, RandAugment))
    assert rand.num_layers == 2 and len(rand.ops) == 15 and all(op.magnitude == 9 for op in rand.ops)
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= {op.name for op in rand.ops}  # inc1
    assert all(op.magnitude_std == 0.5 for op in rand.ops)
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert not any(isinstance(t, T.ColorJitter) for t in steps)  # timm skips colour jitter with RandAugment
    torch.manual_seed(0)
    x = transform(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transform_equals_timms():
    """Our evaluation transform and timm's give the same tensor (crop_pct 0.875 and 0.9)."""
    from timm.data import create_transform

    from lra_soft.imagenet.transforms import eval_transform

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8))
    for crop_pct in (0.875, 0.9):
        theirs = create_transform(24, is_training=False, crop_pct=crop_pct, interpolation="bicubic")
        assert torch.equal(eval_transform(24, crop_pct)(img), theirs(img))


def test_label_smoothing_mixup_and_loss_equal_timms():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    from lra_soft.imagenet.augment import MixupCutmix, smooth_one_hot, soft_target_cross_entropy

    y, logits = torch.tensor([0, 3, 1, 2]), torch.randn(4, 5)
    torch.testing.assert_close(smooth_one_hot(y, 5, 0.1), mixup_target(y, 5, lam=1.0, smoothing=0.1))
    for lam in (0.3, 0.77):
        ours = lam * smooth_one_hot(y, 5, 0.1) + (1 - lam) * smooth_one_hot(y, 5, 0.1).flip(0)
        torch.testing.assert_close(ours, mixup_target(y, 5, lam=lam, smoothing=0.1))
    targets = mixup_target(y, 5, lam=0.6, smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), SoftTargetCrossEntropy()(logits, targets))
    # mixup of the images: the batch blended with itself reversed, one lam per batch, as timm's mode="batch"
    mix = MixupCutmix(5, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
    x = torch.randn(4, 3, 8, 8)
    xm, t = mix(x, y)
    lam = (t[0, 0].item() - 0.02) / 0.9  # sample 0 (class 0) keeps lam of on = 0.92 and 1 - lam of off = 0.02
    torch.testing.assert_close(t, mixup_target(y, 5, lam=lam, smoothing=0.1))
    torch.testing.assert_close(xm, x * lam + x.flip(0) * (1 - lam))


def test_cutmix_box_is_timm_0_3_2s_and_one_pixel_short_of_timm_1s_on_odd_sides():
    """Our box is that of timm 0.3.2 (the authors' version: centre +- cut // 2); timm 1.0 makes the high side
    centre + (cut + 1) // 2, one pixel more where the cut is odd. lam is the area actually kept in both."""
    from timm.data import mixup as tm

    from lra_soft.imagenet.augment import cutmix_box

    differs = 0
    for lam in np.linspace(0.05, 0.95, 19):
        for seed in range(3):
            torch.manual_seed(seed)
            top, bottom, left, right = cutmix_box(20, 17, float(lam))
            torch.manual_seed(seed)
            cy, cx = int(torch.randint(0, 20, ()).item()), int(torch.randint(0, 17, ()).item())
            with pytest.MonkeyPatch.context() as m:  # timm's box at our centre
                m.setattr(tm.np.random, "randint", lambda low, high, size=None, _c=iter((cy, cx)): next(_c))
                yl, yh, xl, xh = tm.rand_bbox((20, 17), float(lam))
            ch, cw = int(20 * math.sqrt(1 - lam)), int(17 * math.sqrt(1 - lam))
            assert (top, left) == (yl, xl)
            assert bottom == min(cy + ch // 2, 20) and right == min(cx + cw // 2, 17)  # timm 0.3.2
            assert (yh - bottom, xh - right) == (min(cy + (ch + 1) // 2, 20) - bottom, min(cx + (cw + 1) // 2, 17)
                                                 - right)
            differs += (yh, xh) != (bottom, right)
    assert differs > 0  # some draws have an odd cut


def test_schedule_equals_timms_cosine_with_warmup_prefix():
    from timm.scheduler import CosineLRScheduler

    from lra_soft.imagenet.train import lr_factor

    warmup, total, lr, warmup_lr, min_lr = 7, 40, 1e-3, 1e-6, 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=total - warmup, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                              warmup_prefix=True, t_in_epochs=False)
    ours = partial(lr_factor, warmup_steps=warmup, total_steps=total, lr=lr, warmup_lr=warmup_lr, min_lr=min_lr)
    for step in range(total):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * ours(step), rel=1e-9, abs=1e-15), step


def test_ema_equals_timms_model_ema_v3():
    """torch's AveragedModel with the EMA average (what the engine uses) and timm's ModelEmaV3, both started from the
    same weights, stay equal over updates (parameters and float buffers)."""
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    theirs = ModelEmaV3(model, decay=0.9)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours.update_parameters(model)  # the first update copies, as ModelEmaV3's construction does
    for _ in range(5):
        with torch.no_grad():
            model(torch.randn(16, 4))  # moves BatchNorm's running statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        theirs.update(model)
        ours.update_parameters(model)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=name)


def test_accuracy_equals_timms():
    from timm.utils import accuracy

    from lra_soft.imagenet.train import evaluate

    torch.manual_seed(0)
    logits, y = torch.randn(64, 10), torch.randint(0, 10, (64,))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x.long().view(-1)]

    loader = [(torch.arange(0, 32).float(), y[:32]), (torch.arange(32, 64).float(), y[32:])]
    ours = evaluate(Fixed(), loader, torch.device("cpu"), amp=False)
    top1, top5 = accuracy(logits, y, topk=(1, 5))
    assert ours["top1"] == pytest.approx(top1.item()) and ours["top5"] == pytest.approx(top5.item())
