"""Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity"), a row of Table 6.

Keys and values are projected along the sequence axis from n to k rows by learned matrices E_i, F_i (k x n) before
softmax attention (Section 4, eq. 7):

    head_i = softmax(Q W_i^Q (E_i K W_i^K)^T / sqrt(d)) F_i V W_i^V,

so the score matrix is n x k and the cost is O(n k). E and F are (heads, k, max_len) parameters, one pair per layer
and per head, drawn from N(0, 1/k) like the Johnson-Lindenstrauss projections of the paper's Theorem 2. A sequence
shorter than ``max_len`` uses the first n columns. Padded keys and values are zeroed before the projection, so padding
contributes nothing to any projected row and outputs at valid positions do not depend on it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lra_soft.attention._common import check_mask, merge_heads, split_heads, zero_padding
from lra_soft.dropout import Dropout


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q (E k)^T / sqrt(d)) (F v) on q, k, v (b, h, n, d) with E, F (h, k, n); padded k, v are zeroed first."""
    k, v = zero_padding(k, mask), zero_padding(v, mask)
    k_proj = E @ k                                                   # (b, h, k, d)
    v_proj = F @ v                                                   # (b, h, k, d)
    scores = q @ k_proj.transpose(-1, -2) / q.shape[-1] ** 0.5       # (b, h, n, k)
    return scores.softmax(dim=-1) @ v_proj                           # (b, h, n, d)


class LinformerAttention(nn.Module):
    """Softmax attention over k learned length-projections of the keys and values."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, k: int = 256,
                 share_kv: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if k < 1:
            raise ValueError(f"linformer k must be >= 1, got {k}")
        self.heads = heads
        self.max_len = max_len
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.E = nn.Parameter(torch.randn(heads, k, max_len) / k ** 0.5)   # (h, k, max_len)
        # share_kv: one projection for keys and values (the paper's "key-value sharing", Section 4)
        self.F = None if share_kv else nn.Parameter(torch.randn(heads, k, max_len) / k ** 0.5)
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"linformer got a sequence of length {n} but was built with max_len={self.max_len}; "
                             f"build it with max_len >= {n}")
        q, k, v = (split_heads(w(x), self.heads) for w in (self.W_q, self.W_k, self.W_v))  # (b, h, n, d)
        E = self.E[:, :, :n]                                                                 # (h, k, n)
        F = E if self.F is None else self.F[:, :, :n]
        out = linformer_attention(q, k, v, E.to(q.dtype), F.to(q.dtype), mask)
        return self.drop(self.ff(merge_heads(out)))
