"""lra-soft: SOFT (Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021) and baselines.

Importing this package does no work: models are built on request, e.g. ``build_attention("soft", 64, 2, max_len=2048)``.
"""
from lra_soft.attention import ATTENTION, build_attention

__all__ = ["ATTENTION", "build_attention"]
