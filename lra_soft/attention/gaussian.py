"""Exact Gaussian-kernel attention, the O(n^2) reference that SOFT approximates (Lu et al., NeurIPS 2021).

    y_i = sum_j S_ij v_j,   S_ij = exp(-||q_i - q_j||^2 / (2 sqrt(d)))          (eqs. 2, 4, 5; Q = K)

No softmax and no row normalisation. The paper's Appendix A.3 reports that training with this exact kernel fails to
converge; it is kept as the reference for SOFT (SOFT with every token a landmark equals it) and for that ablation.
The distance is computed in the expanded form |q_i|^2 + |q_j|^2 - 2 q_i.q_j, clamped at 0, in float32 or float64.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lra_soft.attention._common import check_mask, merge_heads, split_heads, zero_padding
from lra_soft.dropout import Dropout


def gaussian_kernel_matrix(x: Tensor, y: Tensor) -> Tensor:
    """exp(-||x_i - y_j||^2 / (2 sqrt(d))) for x (..., m, d), y (..., n, d); returns (..., m, n)."""
    scale = x.shape[-1] ** -0.5
    sq_dist = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)
    return torch.exp(-0.5 * scale * sq_dist.clamp(min=0))


def gaussian_attention(q: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Exact S V on (b, h, n, d) with K = Q; padded keys are left out and padded query rows are zero."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, v = zero_padding(q.to(dtype), mask), zero_padding(v.to(dtype), mask)
        out = gaussian_kernel_matrix(q, q) @ v  # (b, h, n, d): padded keys contribute v_j = 0
        return zero_padding(out, mask)


class GaussianAttention(nn.Module):
    """Exact (quadratic) Gaussian-kernel attention with Q = K: the reference for SOFT (paper A.3)."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.W_q = nn.Linear(dim, dim)  # shared query/key projection (Q = K, Section 3.1)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        q, v = split_heads(self.W_q(x), self.heads), split_heads(self.W_v(x), self.heads)  # (b, h, n, d)
        out = gaussian_attention(q, v, mask).to(v.dtype)
        return self.drop(self.ff(merge_heads(out)))
