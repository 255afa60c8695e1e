"""SOFT ImageNet backbones (Lu et al., NeurIPS 2021, Section 3.3, Table 2): configs, model, FLOPs/params summary.

    from lra_soft.vision import build_model
    model = build_model("soft_tiny")            # 13M parameters, (b, 3, 224, 224) -> (b, 1000)

timm registration is opt-in: ``import lra_soft.vision.timm_models`` (needs timm).
"""
from lra_soft.vision.config import PAPER, PRESETS, VisionConfig, preset
from lra_soft.vision.model import SoftVisionTransformer, build_model

__all__ = ["PAPER", "PRESETS", "SoftVisionTransformer", "VisionConfig", "build_model", "preset"]
