"""Performer attention (Choromanski et al., ICLR 2021, "Rethinking Attention with Performers"): FAVOR+.

The softmax kernel exp(q^T k / sqrt(d)) is the expectation of a product of positive random features (Lemma 1):
with x = q / d^(1/4), y = k / d^(1/4) and w ~ N(0, I_d),

    exp(x^T y) = E_w[exp(w^T x - ||x||^2 / 2) exp(w^T y - ||y||^2 / 2)],

so with phi(x) = exp(W x - ||x||^2 / 2) / sqrt(m) for m features W (m x d), attention becomes
D^-1 phi(Q) (phi(K)^T V) with D = diag(phi(Q) phi(K)^T 1), linear in n (Section 2.2). The rows of W are orthogonal
(Section 2.4): stacked blocks of a Haar-random d x d orthogonal matrix, each row rescaled to a chi(d)-distributed norm
so that it is marginally N(0, I_d) and the estimator stays unbiased.

Numerical stabilisation: a constant is subtracted in the exponent before exp, per query over its features and per
(batch, head) over all valid keys and features. Either constant cancels between numerator and denominator, so this is
exact; it is taken over valid keys only, so padding cannot change it.

Redraw policy: the features are a buffer (saved and loaded with the state dict). In training mode they are redrawn
before every ``redraw_every``-th forward pass (0 = never); in eval mode they never change. A redraw is a function of
two more buffers, a seed drawn at construction and the pass counter, so a resumed run redraws exactly as an
uninterrupted one, and DDP processes (which share buffers from rank 0 at start) redraw identical features.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lra_soft.attention._common import check_mask, merge_heads, split_heads
from lra_soft.dropout import Dropout


def orthogonal_features(m: int, d: int, *, device=None, dtype=torch.float32,
                        generator: torch.Generator | None = None) -> Tensor:
    """m x d Gaussian features with orthogonal rows within each block of d (Section 2.4), drawn on the CPU."""
    q, r = torch.linalg.qr(torch.randn(math.ceil(m / d), d, d, generator=generator))  # a block per d features
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]    # the sign fix makes q Haar-distributed
    w = q.transpose(-1, -2).reshape(-1, d)[:m]                                         # (m, d), unit rows
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return (w * norms).to(device=device, dtype=dtype)


def positive_features(x: Tensor, w: Tensor, *, mask: Tensor | None = None, is_query: bool) -> Tensor:
    """phi(x) = exp(w x - ||x||^2 / 2 - c) / sqrt(m) on x (b, h, n, d) already scaled by d^-1/4; padded keys get 0.

    c is the maximum exponent per query (``is_query``) or per (batch, head) over valid keys; it cancels in FAVOR+.
    """
    logits = x @ w.transpose(-1, -2) - x.pow(2).sum(-1, keepdim=True) / 2  # (b, h, n, m)
    valid = None if mask is None else mask[:, None, :, None]
    if is_query:
        c = logits.amax(dim=-1, keepdim=True)                                 # (b, h, n, 1)
    else:
        masked = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
        c = masked.amax(dim=(-1, -2), keepdim=True)                           # (b, h, 1, 1)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))            # a sequence with no valid token
    phi = torch.exp(logits - (c.detach() + 0.5 * math.log(w.shape[0])))     # the 1/sqrt(m) folded into the exponent
    if valid is not None and not is_query:
        phi = phi.masked_fill(~valid, 0.0)
    return phi


def favor_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, mask: Tensor | None = None) -> Tensor:
    """FAVOR+ estimate of softmax(q k^T / sqrt(d)) v on (b, h, n, d) with features w (m, d); padded keys excluded."""
    scale = q.shape[-1] ** -0.25
    phi_q = positive_features(q * scale, w, is_query=True)                    # (b, h, n, m)
    phi_k = positive_features(k * scale, w, mask=mask, is_query=False)        # (b, h, n, m)
    kv = phi_k.transpose(-1, -2) @ v                                          # (b, h, m, d)
    normaliser = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)                      # (b, h, n, 1)
    return (phi_q @ kv) / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny)


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class PerformerAttention(nn.Module):
    """Softmax attention estimated with FAVOR+ positive orthogonal random features."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, num_features: int = 256,
                 redraw_every: int = 1000):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if num_features < 1 or redraw_every < 0:
            raise ValueError(f"performer needs num_features >= 1 and redraw_every >= 0, got {num_features}, "
                             f"{redraw_every}")
        self.heads = heads
        self.redraw_every = redraw_every  # training forward passes between redraws; 0 = never
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)
        self.register_buffer("features", orthogonal_features(num_features, dim // heads))  # (m, d)
        self.register_buffer("seed", torch.randint(2 ** 62, ()))                         # for redraws
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))                 # training passes so far

    @torch.no_grad()
    def redraw_features(self) -> None:
        m, d = self.features.shape
        generator = torch.Generator().manual_seed(int(self.seed) + int(self.calls))
        self.features.copy_(orthogonal_features(m, d, generator=generator))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        if self.training:
            calls = int(self.calls)
            if self.redraw_every and calls and calls % self.redraw_every == 0:
                self.redraw_features()
            self.calls += 1
        q, k, v = (split_heads(w(x), self.heads) for w in (self.W_q, self.W_k, self.W_v))  # (b, h, n, d)
        # exp of random projections loses too much in half precision: the estimator runs in float32 (or float64)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = _upcast(q), _upcast(k), _upcast(v)
            out = favor_attention(q, k, v, self.features.to(q.dtype), mask)
        return self.drop(self.ff(merge_heads(out)))
