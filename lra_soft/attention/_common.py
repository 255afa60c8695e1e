"""Helpers shared by the attention variants: head split/merge and padding masks.

Shapes: b batch, n sequence length, h heads, d head dim, m landmarks / features.
"""
from __future__ import annotations

import torch
from torch import Tensor


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # (b, h, n, d)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (b, n, h*d)


def check_mask(x: Tensor, mask: Tensor | None) -> Tensor | None:
    """Validate a padding mask against ``x`` of shape (b, n, ...): bool (b, n), True = real token."""
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, n) = {tuple(x.shape[:2])}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
    return mask


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded rows of (b, h, n, d) so that whatever they held cannot leak into any sum."""
    if mask is None:
        return x
    return x.masked_fill(~mask[:, None, :, None], 0.0)
