"""Helpers shared by the attention variants: head split/merge, padding masks and the depthwise convolution of V.

Shapes: b batch, n sequence length, h heads, d head dim, m landmarks / features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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


def check_conv_kernel(name: str, kernel: int) -> int:
    """0 (no convolution) or an odd length, so that the convolution keeps each token at its own position."""
    if not isinstance(kernel, int) or kernel < 0 or (kernel and kernel % 2 == 0):
        raise ValueError(f"{name} conv_kernel must be 0 (no convolution) or odd, got {kernel!r}")
    return kernel


class TokenConv(nn.Conv2d):
    """Depthwise convolution of V along the tokens, added to an attention's output: one (kernel x 1) filter per head,
    shared over the head's channels, no bias (the authors' ``Conv2d(heads, heads, (k, 1), groups=heads)``, the
    Nystromformer's "skip connection of V" and SOFT's local branch). Padded tokens are zeroed first, so that they add
    nothing to a valid token's output."""

    def __init__(self, heads: int, kernel: int):
        super().__init__(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)

    def forward(self, v: Tensor, mask: Tensor | None = None) -> Tensor:
        # (b, h, n, d) -> (b, h, n, d); the weight follows v's dtype (the attentions run in float32 under autocast)
        return nn.functional.conv2d(zero_padding(v, mask), self.weight.to(v.dtype), padding=self.padding,
                                    groups=self.groups)
