"""Reformer LSH attention (Kitaev et al., ICLR 2020, "Reformer: The Efficient Transformer"), a row of Table 6.

Shared-QK attention (Section 2): one projection gives the queries q_i and the keys k_j = q_j / ||q_j||; the logits
are q_i . k_j (no further 1/sqrt(d), as in the Hugging Face port of the authors' trax code). Angular LSH (Section 2,
after Andoni et al. 2015) hashes a vector x to h(x) = argmax([x R; -x R]) for a random rotation R (d x n_buckets/2).
Per hash round, tokens are sorted by (bucket, position), the sorted sequence is cut into chunks of ``bucket_size``, and
every query attends to the keys of its own chunk and of the previous chunk (Figure 2). A token attends to itself only
when no other key is available: its own logit is replaced by -1e5 (Section 2, "shared-QK"). The ``n_hashes`` rounds are
combined by their log-sum-exp weights, out_i = sum_r exp(z_r,i - logsumexp_r z_r,i) o_r,i (Section 2, "multi-round
LSH").

Padding and determinism, chosen so that padding cannot change a valid output:
- padded tokens go to an extra bucket sorted after every real bucket, so the sorted valid tokens and therefore all
  chunks that hold them are the same whatever follows; padded keys are masked (logit -1e9);
- each round is sorted and chunked on its own and the first chunk has no previous chunk (no wrap-around), so the
  amount of padding in one round cannot shift the chunks of another;
- the number of buckets follows ``max_len`` (2 max_len / bucket_size, rounded down to a power of two, at least 2),
  not the padded length.
Rotations: fresh random rotations at every training forward pass, as in the paper; in eval mode the fixed buffer
``rotations`` (saved with the state dict) is used, so evaluation is deterministic.
A key that falls in a query's window in several rounds is counted once per round (no duplicate correction), as in the
Hugging Face implementation that the LRA harness used.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lra_soft.attention._common import check_mask, merge_heads, split_heads
from lra_soft.dropout import Dropout

SELF_LOGIT = -1e5      # a token sees itself only when nothing else is in its window
PADDING_LOGIT = -1e9   # padded keys, and the missing previous chunk of the first chunk


def lsh_buckets(x: Tensor, rotations: Tensor) -> Tensor:
    """Angular LSH buckets of x (b, h, n, d) for rotations (d, n_hashes, n_buckets / 2): (b, h, n_hashes, n)."""
    rotated = torch.einsum("bhnd,drk->bhrnk", x, rotations.to(x.dtype))   # (b, h, r, n, n_buckets/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def _look_back(t: Tensor, fill: float | bool) -> Tensor:
    """Concatenate each chunk (dim -3 of t (..., C, c, ...)) with the previous one; the first gets ``fill``."""
    prev = torch.cat([torch.full_like(t[..., :1, :, :], fill), t[..., :-1, :, :]], dim=-3)
    return torch.cat([prev, t], dim=-2)


def lsh_attention(qk: Tensor, v: Tensor, buckets: Tensor, mask: Tensor | None = None, *, n_buckets: int,
                  bucket_size: int) -> Tensor:
    """Sorted-bucket chunked shared-QK attention on qk, v (b, h, n, d) given buckets (b, h, r, n).

    Returns the rounds combined by log-sum-exp, (b, h, n, d).
    """
    b, h, n, d = qk.shape
    r = buckets.shape[2]
    c = bucket_size
    pad = -n % c
    valid = torch.ones(b, n, dtype=torch.bool, device=qk.device) if mask is None else mask
    if pad:  # internal padding to whole chunks, sorted last like any padding
        qk = torch.cat([qk, qk.new_zeros(b, h, pad, d)], dim=2)
        v = torch.cat([v, v.new_zeros(b, h, pad, d)], dim=2)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], dim=1)
        buckets = torch.cat([buckets, buckets.new_zeros(b, h, r, pad)], dim=3)
    N = n + pad
    C = N // c

    # sort every round by (bucket, position); padding gets bucket n_buckets, after all real ones
    buckets = torch.where(valid[:, None, None, :], buckets, torch.full_like(buckets, n_buckets))
    pos = torch.arange(N, device=qk.device)
    order = (buckets * N + pos).argsort(dim=-1)                                     # (b, h, r, N)
    gather = order[..., None].expand(b, h, r, N, d)
    q_s = qk[:, :, None].expand(b, h, r, N, d).gather(3, gather)                    # (b, h, r, N, d)
    v_s = v[:, :, None].expand(b, h, r, N, d).gather(3, gather)
    valid_s = valid[:, None, None, :].expand(b, h, r, N).gather(3, order)          # (b, h, r, N)

    # chunk and look one chunk back; keys are the unit-normalised queries
    q_c = q_s.view(b, h, r, C, c, d)
    k_c = _look_back((q_c / q_c.norm(dim=-1, keepdim=True).clamp_min(1e-6)), 0.0)  # (b, h, r, C, 2c, d)
    v_c = _look_back(v_s.view(b, h, r, C, c, d), 0.0)
    pos_c = order.view(b, h, r, C, c)
    key_pos = _look_back(pos_c[..., None], -1)[..., 0]                             # (b, h, r, C, 2c)
    key_valid = _look_back(valid_s.view(b, h, r, C, c)[..., None], False)[..., 0]

    logits = q_c @ k_c.transpose(-1, -2)                                            # (b, h, r, C, c, 2c)
    logits = logits.masked_fill(pos_c[..., None] == key_pos[..., None, :], SELF_LOGIT)
    logits = logits.masked_fill(~key_valid[..., None, :], PADDING_LOGIT)
    lse = logits.logsumexp(dim=-1, keepdim=True)                                    # (b, h, r, C, c, 1)
    out_s = torch.exp(logits - lse) @ v_c                                           # (b, h, r, C, c, d)

    # undo the sort, then combine the rounds with weights softmax_r(lse)
    undo = order.argsort(dim=-1)
    out = out_s.view(b, h, r, N, d).gather(3, undo[..., None].expand(b, h, r, N, d))
    lse = lse.view(b, h, r, N).gather(3, undo)
    weights = torch.softmax(lse, dim=2)                                             # (b, h, r, N)
    out = (weights[..., None] * out).sum(dim=2)                                     # (b, h, N, d)
    return out[:, :, :n]


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class ReformerAttention(nn.Module):
    """LSH attention with shared queries and keys, sorted-bucket chunks and multi-round hashing."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, n_hashes: int = 2,
                 bucket_size: int = 64, n_buckets: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if n_hashes < 1 or bucket_size < 1:
            raise ValueError(f"reformer needs n_hashes >= 1 and bucket_size >= 1, got {n_hashes}, {bucket_size}")
        if n_buckets is None:  # about two buckets per chunk at max_len, as the paper's and HF's defaults
            n_buckets = max(2, 1 << max(1, (2 * max_len // bucket_size).bit_length() - 1))
        if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"reformer n_buckets must be 1 or even, got {n_buckets}")
        self.heads = heads
        self.n_hashes = n_hashes
        self.bucket_size = bucket_size    # chunk length of the sorted sequence
        self.n_buckets = n_buckets
        self.W_qk = nn.Linear(dim, dim)   # shared queries and keys
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)
        self.register_buffer("rotations", self._draw_rotations(dim // heads))  # (d, n_hashes, n_buckets/2)

    def _draw_rotations(self, d: int, device=None) -> Tensor:
        return torch.randn(d, self.n_hashes, max(1, self.n_buckets // 2), device=device)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        qk, v = split_heads(self.W_qk(x), self.heads), split_heads(self.W_v(x), self.heads)  # (b, h, n, d)
        rotations = self.rotations
        if self.training:
            rotations = self._draw_rotations(qk.shape[-1], qk.device)
        # the -1e9 / -1e5 logits need float32
        with torch.autocast(x.device.type, enabled=False):
            qk, v = _upcast(qk), _upcast(v)
            if self.n_buckets == 1:
                buckets = torch.zeros(qk.shape[0], self.heads, self.n_hashes, qk.shape[2], dtype=torch.long,
                                      device=qk.device)
            else:
                buckets = lsh_buckets(qk.detach(), rotations)
            out = lsh_attention(qk, v, buckets, mask, n_buckets=self.n_buckets, bucket_size=self.bucket_size)
        return self.drop(self.ff(merge_heads(out)))
