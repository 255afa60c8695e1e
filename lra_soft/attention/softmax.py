"""Exact softmax attention (Vaswani et al., 2017): softmax(Q K^T / sqrt(d)) V, the O(n^2) baseline of Table 6.

The fast path is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them); ``softmax_attention_reference`` is the plain path that the tests hold it to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_soft.attention._common import check_mask, merge_heads, split_heads
from lra_soft.dropout import Dropout


def softmax_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on (b, h, n, d); padded keys (mask False) get zero weight."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (b, h, n, n)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class SoftmaxAttention(nn.Module):
    """Exact softmax attention through PyTorch SDPA."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout  # dropout on the attention weights (the harness uses 0.1 for softmax)
        self.fused = fused                # False: the manual reference path
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        q, k, v = (split_heads(w(x), self.heads) for w in (self.W_q, self.W_k, self.W_v))  # (b, h, n, d)
        p = self.attn_dropout if self.training else 0.0
        if self.fused:
            # SDPA's boolean mask means "may attend"; (b, 1, 1, n) broadcasts over heads and queries.
            attn_mask = None if mask is None else mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            out = softmax_attention_reference(q, k, v, mask)
            if p:
                raise ValueError("attention dropout is only implemented on the fused path")
        return self.drop(self.ff(merge_heads(out)))
