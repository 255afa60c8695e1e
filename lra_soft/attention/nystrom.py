"""Nystromformer attention (Xiong et al., AAAI 2021, "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention"), a row of Table 6.

With Q, K scaled by d^(-1/4) and landmarks Q~, K~ (the means of m contiguous segments of Q and K, Section 3),
softmax attention is approximated as (eq. 15)

    softmax(Q K~^T) A^+ softmax(Q~ K^T) V,    A = softmax(Q~ K~^T)  (m x m),

where A^+ is the paper's iterative Moore-Penrose approximation (Section 3, after Razavi et al. 2014)
Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))) / 4, started at Z_0 = A^T / (||A||_1 ||A||_inf), 6 iterations.
A depthwise convolution over V (kernel 35 along the sequence, one filter per head, no bias) is added to the output as
in the authors' code (their "skip connection of V").

Padding: each sequence's own valid tokens are cut into m contiguous segments by their rank among valid tokens (so a
length that is not a multiple of m works and padding never enters a landmark). A segment with no valid token (valid
length < m) gives no landmark: its column is masked in both softmaxes and its row of A is replaced by the identity row,
which keeps A^+ block-diagonal so that the empty landmark contributes nothing. Padded keys are masked in
softmax(Q~ K^T) and padded values are zeroed before the convolution.

Departures from the authors' code, on purpose: the initial scale ||A||_1 ||A||_inf is taken per matrix (per batch
element and head), not as one maximum over the whole batch, so an output never depends on the rest of the batch; and
the length need not be a multiple of m.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lra_soft.attention._common import (TokenConv, check_conv_kernel, check_mask, merge_heads, split_heads,
                                       zero_padding)
from lra_soft.dropout import Dropout


def iterative_pinv(A: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose inverse of A (..., m, m) by the Nystromformer iteration from Z_0 = A^T / (||A||_1 ||A||_inf).

    The initial scale is per matrix, so one matrix's result never depends on the others in the batch."""
    abs_A = A.abs()
    scale = abs_A.sum(dim=-2).amax(dim=-1) * abs_A.sum(dim=-1).amax(dim=-1)  # ||A||_1 ||A||_inf, (...)
    Z = A.transpose(-1, -2) / scale[..., None, None]
    I = torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    for _ in range(iters):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * I - AZ @ (15 * I - AZ @ (7 * I - AZ)))
    return Z


def segment_ids(mask: Tensor | None, b: int, n: int, m: int, device) -> tuple[Tensor, Tensor]:
    """Segment of every token (b, n) in 0..m-1 (padding -> m) and the landmark mask (b, m): segment non-empty."""
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    rank = mask.long().cumsum(dim=1) - 1                              # rank among the valid tokens, (b, n)
    length = mask.sum(dim=1, keepdim=True).clamp_min(1)               # (b, 1)
    seg = torch.div(rank * m, length, rounding_mode="floor")          # segments of size floor/ceil(length / m)
    seg = torch.where(mask, seg, torch.full_like(seg, m))
    counts = torch.zeros(b, m + 1, device=device).scatter_add_(1, seg, torch.ones(b, n, device=device))
    return seg, counts[:, :m] > 0


def segment_means(x: Tensor, seg: Tensor, m: int) -> Tensor:
    """Mean of x (b, h, n, d) over each segment of ``seg`` (b, n); empty segments give 0. Returns (b, h, m, d)."""
    b, h, n, d = x.shape
    index = seg[:, None, :, None].expand(b, h, n, d)
    sums = x.new_zeros(b, h, m + 1, d).scatter_add(2, index, x)
    counts = x.new_zeros(b, m + 1).scatter_add(1, seg, x.new_ones(b, n))
    return sums[:, :, :m] / counts[:, None, :m, None].clamp_min(1)


def nystrom_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, num_landmarks: int = 64,
                      pinv_iterations: int = 6, inverse: str = "iterative") -> Tensor:
    """Nystromformer eq. (15) on q, k, v (b, h, n, d), without the convolution; ``inverse="pinv"`` is exact."""
    b, _, n, d = q.shape
    m = num_landmarks
    q, k = zero_padding(q, mask) * d ** -0.25, zero_padding(k, mask) * d ** -0.25
    seg, landmark_mask = segment_ids(mask, b, n, m, q.device)
    q_l, k_l = segment_means(q, seg, m), segment_means(k, seg, m)          # (b, h, m, d)
    low = torch.finfo(q.dtype).min
    lm_cols = landmark_mask[:, None, None, :]                                # (b, 1, 1, m)

    kernel_1 = (q @ k_l.transpose(-1, -2)).masked_fill(~lm_cols, low).softmax(dim=-1)      # (b, h, n, m)
    kernel_2 = (q_l @ k_l.transpose(-1, -2)).masked_fill(~lm_cols, low).softmax(dim=-1)    # (b, h, m, m)
    eye = torch.eye(m, device=q.device, dtype=q.dtype)
    kernel_2 = torch.where(landmark_mask[:, None, :, None], kernel_2, eye)   # empty landmark: identity row
    scores_3 = q_l @ k.transpose(-1, -2)                                      # (b, h, m, n)
    if mask is not None:
        scores_3 = scores_3.masked_fill(~mask[:, None, None, :], low)
    kernel_3 = scores_3.softmax(dim=-1)

    if inverse == "iterative":
        A_pinv = iterative_pinv(kernel_2, pinv_iterations)
    elif inverse == "pinv":
        A_pinv = torch.linalg.pinv(kernel_2)
    else:
        raise ValueError(f"unknown nystrom inverse {inverse!r}; choose from ['iterative', 'pinv']")
    return kernel_1 @ (A_pinv @ (kernel_3 @ v))                              # (b, h, n, d)


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class NystromAttention(nn.Module):
    """Softmax attention approximated with segment-mean landmarks and an iterative pseudo-inverse."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, num_landmarks: int = 64,
                 pinv_iterations: int = 6, inverse: str = "iterative", conv_kernel: int = 35):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if num_landmarks < 1:
            raise ValueError(f"nystrom num_landmarks must be >= 1, got {num_landmarks}")
        if inverse not in ("iterative", "pinv"):
            raise ValueError(f"unknown nystrom inverse {inverse!r}; choose from ['iterative', 'pinv']")
        check_conv_kernel("nystrom", conv_kernel)
        self.heads = heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.inverse = inverse              # "iterative" or "pinv" (torch.linalg.pinv, the exact reference)
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.conv = TokenConv(heads, conv_kernel) if conv_kernel else None  # the authors' skip connection of V
        self.ff = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        q, k, v = (split_heads(w(x), self.heads) for w in (self.W_q, self.W_k, self.W_v))  # (b, h, n, d)
        # the iterative inverse needs float32 at least; the authors' harness also runs attention outside autocast
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = _upcast(q), _upcast(k), _upcast(v)
            out = nystrom_attention(q, k, v, mask, num_landmarks=self.num_landmarks,
                                    pinv_iterations=self.pinv_iterations, inverse=self.inverse)
            if self.conv is not None:
                out = out + self.conv(v, mask)
        return self.drop(self.ff(merge_heads(out)))
