"""The ImageNet training recipes of ``imagenet train --recipe``, as data: ``paper`` and ``authors``.

``paper`` is what Section 4.1 lists: random resized crop, flip, mixup, CutMix and label smoothing (the DeiT code base
it names), trained on torch alone with the transforms of ``lra_soft.imagenet.transforms``.

``authors`` is what the SOFT authors' ``main.py`` (timm 0.3.2, DeiT-style) and ``config/SOFT_*.yaml`` do on top:
- RandAugment ``rand-m9-mstd0.5-inc1``, random erasing with probability 0.25 (per-pixel noise, one box),
  colour jitter 0.4 and a random (bilinear or bicubic) training interpolation, all through timm's
  ``create_transform``, as the authors' code builds them. As in the authors' run, timm applies colour jitter only when
  no auto-augment policy is given, so here it has no effect;
- cosine floor 5e-5, gradient clipping 1.0, EMA of the weights with decay 0.99996 (the reported accuracies are the
  EMA's), evaluation crop 0.9 (224 from 248: timm 0.3.2's ViT default configuration, which their models carry);
- peak lr per 1024 images 1e-3 (Tiny, Small), 3.5e-4 (Medium), 3.3e-4 (Large), 2.7e-4 (Huge).
A recipe's values are defaults: a flag given on the command line wins. Not reproduced: timm 0.3.2 steps the cosine
schedule once per epoch and adds 10 cool-down epochs at the floor (310 in all); here the schedule moves every step
and ends at epoch 300.

The recipe's settings are saved in the run's ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lra_soft.imagenet.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform

TIMM_INSTALL = "pip install 'lra-soft[timm]'"


@dataclass(frozen=True)
class TrainingRecipe:
    name: str
    # --- training augmentation (the arguments of timm.data.create_transform) ---
    scale: tuple[float, float] = (0.08, 1.0)     # random resized crop: share of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio
    hflip: float = 0.5                           # horizontal flip probability
    interpolation: str = "bicubic"               # "random": bilinear or bicubic per image (timm)
    auto_augment: str | None = None              # timm policy string, e.g. RandAugment "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = None            # brightness/contrast/saturation; timm ignores it with auto_augment
    re_prob: float = 0.0                         # random erasing probability (on the normalised tensor)
    re_mode: str = "pixel"                       # erased pixels drawn per pixel from a normal distribution
    re_count: int = 1                            # boxes erased per image
    uses_timm: bool = False                      # built by timm's create_transform (else our torchvision equal)
    # --- ImageNetConfig fields this recipe sets unless their flag is given ---
    config: tuple[tuple[str, Any], ...] = ()
    lr_by_model: tuple[tuple[str, float], ...] = ()  # peak lr per 1024 images of the backbones that differ

    def defaults(self, model: str) -> dict[str, Any]:
        """The ImageNetConfig values of this recipe for ``model``."""
        values = dict(self.config)
        lr = dict(self.lr_by_model).get(model)
        return {**values, "lr": lr} if lr is not None else values

    def settings(self) -> dict[str, Any]:
        """Everything the recipe decides, for the run's config.json."""
        return {"name": self.name, "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip,
                "interpolation": self.interpolation, "auto_augment": self.auto_augment,
                "color_jitter": self.color_jitter, "re_prob": self.re_prob, "re_mode": self.re_mode,
                "re_count": self.re_count, "uses_timm": self.uses_timm, "config": dict(self.config),
                "lr_by_model": dict(self.lr_by_model)}


RECIPES = {
    "paper": TrainingRecipe("paper"),
    "authors": TrainingRecipe(
        "authors", interpolation="random", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25,
        uses_timm=True,
        config=(("min_lr", 5e-5), ("clip_grad", 1.0), ("ema_decay", 0.99996), ("crop_pct", 0.9)),
        lr_by_model=(("soft_medium", 3.5e-4), ("soft_large", 3.3e-4), ("soft_huge", 2.7e-4))),
}


def get_recipe(name: str) -> TrainingRecipe:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def _timm_data():
    """timm's data package, or a one-line error naming the extra (timm needs a torchvision built for this torch)."""
    try:
        import timm.data
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch build
        raise ValueError(f"--recipe authors draws the authors' augmentations from timm, which cannot be imported "
                         f"here ({e.__class__.__name__}: {e}): {TIMM_INSTALL} (timm needs a torchvision built for "
                         f"this torch), or use --recipe paper") from None
    return timm.data


def check_available(recipe: TrainingRecipe) -> None:
    """Fail before any work when the recipe needs a library that is not importable."""
    if recipe.uses_timm:
        _timm_data()


def build_train_transform(recipe: TrainingRecipe, size: int):
    """The training transform of ``recipe`` at ``size``: PIL RGB image -> normalised float tensor (3, size, size)."""
    if not recipe.uses_timm:  # the paper's settings are our transforms' defaults (tested)
        return train_transform(size)
    return _timm_data().create_transform(
        size, is_training=True, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip, vflip=0.0,
        color_jitter=recipe.color_jitter, auto_augment=recipe.auto_augment, interpolation=recipe.interpolation,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=recipe.re_prob, re_mode=recipe.re_mode,
        re_count=recipe.re_count)
