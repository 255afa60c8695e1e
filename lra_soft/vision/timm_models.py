"""Registers the SOFT backbones with timm's model registry, so ``timm.create_model("soft_tiny")`` builds them.

Importing this module is the opt-in (as importing a timm model file is); it needs timm. The entry points accept
timm's usual keywords (``num_classes``, ``in_chans``, ``img_size``, ``drop_rate``, ``drop_path_rate``) and any
``VisionConfig`` field; there are no pretrained weights.
"""
from __future__ import annotations

from timm.models import register_model

from lra_soft.vision.model import SoftVisionTransformer, build_model

_TIMM_NAMES = {"drop_rate": "dropout", "drop_path_rate": "drop_path"}
_TIMM_IGNORED = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # passed by timm.create_model


def _create(name: str, pretrained: bool, kwargs: dict) -> SoftVisionTransformer:
    if pretrained:
        raise ValueError(f"no pretrained weights are available for {name}; use pretrained=False")
    for key in _TIMM_IGNORED:
        kwargs.pop(key, None)
    return build_model(name, **{_TIMM_NAMES.get(k, k): v for k, v in kwargs.items()})


@register_model
def soft_tiny(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create("soft_tiny", pretrained, kwargs)


@register_model
def soft_small(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create("soft_small", pretrained, kwargs)


@register_model
def soft_medium(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create("soft_medium", pretrained, kwargs)


@register_model
def soft_large(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create("soft_large", pretrained, kwargs)


@register_model
def soft_huge(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create("soft_huge", pretrained, kwargs)
