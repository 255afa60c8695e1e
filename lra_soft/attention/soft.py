"""SOFT: softmax-free attention with linear complexity (Lu et al., "SOFT: Softmax-free Transformer with Linear
Complexity", NeurIPS 2021): `soft_attention`, the function both the LRA encoder and the ImageNet backbones call, and
`SoftAttention`, the registry's module.

SOFT lives in three files, one job each:
- `soft_reference`: the paper's math in plain PyTorch, top to bottom against the paper: the options (`SoftOptions`),
  the Gaussian kernel, the Newton-Raphson inverse (Algorithm 2), the bottleneck tokens and the exact reference
  `soft_attention_reference`;
- `soft_fused`: the same product P^T (A^+ (P V)) fused for the CPU, with a hand-written backward;
- this file: the choice between the two, and the module (projections, learned `conv` landmarks, dropout) with two
  pieces of the authors' code that the paper's LRA setting does not have, both off by default:
  `landmark_norm`, LayerNorm + GELU after the landmark convolution, the landmarks then entering the kernel at the
  LayerNorm's scale (as in the authors' ImageNet code and in the LRA port of SOFT by the Nystromformer authors), and
  `conv_kernel`, a depthwise convolution of V added to the output (the ImageNet models' k = 9, 5, 3; the LRA port's
  optional 33).
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_soft import allocator
from lra_soft.attention._common import TokenConv, check_conv_kernel, check_mask, merge_heads, split_heads, zero_padding
from lra_soft.attention.soft_fused import soft_product
from lra_soft.attention.soft_reference import (INVERSE, NEWTON_GRAD, NEWTON_INIT, SAMPLING, SoftOptions,
                                               gaussian_kernel, newton_alpha, newton_inverse, newton_inverse_unrolled,
                                               sample_landmarks, soft_attention_reference, soft_attention_with,
                                               soft_product_reference, takes_soft_options)
from lra_soft.dropout import Dropout

__all__ = ["INVERSE", "NEWTON_GRAD", "NEWTON_INIT", "SAMPLING", "SoftAttention", "SoftOptions", "gaussian_kernel",
           "newton_alpha", "newton_inverse", "newton_inverse_unrolled", "sample_landmarks", "soft_attention",
           "soft_attention_reference"]


@takes_soft_options
def soft_attention(q: Tensor, v: Tensor, mask: Tensor | None = None, *, landmarks: Tensor | None = None,
                   landmark_mask: Tensor | None = None, **options) -> Tensor:
    """SOFT attention P^T (A^+ (P V)) (eq. 9) on q, v of shape (b, h, n, d), with K = Q; `options` are the fields of
    `SoftOptions`.

    mask: bool (b, n), True = real token. landmarks: optional bottleneck tokens (b, h, m, d) in q's space (e.g. from a
    2D strided convolution), with optional validity landmark_mask (b, m); when given, `sampling` is not used.
    inverse: "newton" (Algorithm 2, `iters` steps), "solve" (Cholesky of A + ridge I) or "pinv" (torch.linalg.pinv,
    the reference). Returns (b, h, n, d) in q's dtype; rows of padded tokens are zero.

    Newton with the analytic gradient and the Cholesky solve run the fused product (`soft_fused`); "pinv" and
    newton_grad="unrolled" run the reference's plain autograd (`soft_attention_reference`).

    The first call on CPU tensors tunes glibc malloc to keep freed large blocks (`lra_soft.allocator`: without it,
    every m x m and n x m block is page-faulted afresh at each call); LRA_SOFT_MALLOC_TUNING=0 or
    `allocator.set_lazy_tuning(False)` before that call opts out.
    """
    if not torch.compiler.is_compiling():
        allocator.tune_on_first_cpu_use(q.device.type)
    opts = SoftOptions(**options)
    fused = opts.inverse in ("newton", "solve") and opts.newton_grad == "analytic"
    product = soft_product if fused else soft_product_reference
    return soft_attention_with(product, q, v, mask, landmarks, landmark_mask, opts)


class SoftAttention(nn.Module):
    """SOFT: Gaussian-kernel attention without softmax, Nystrom-approximated through m landmarks (linear in n)."""

    @takes_soft_options
    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, landmark_norm: bool = False,
                 conv_kernel: int = 0, **options):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        opts = SoftOptions(**options)
        if opts.sampling == "conv" and opts.num_landmarks is not None:
            raise ValueError("sampling='conv' has a fixed kernel = stride = window; it cannot take num_landmarks")
        if landmark_norm and opts.sampling != "conv":
            raise ValueError(f"landmark_norm=True normalises learned landmarks: it needs sampling='conv' (e.g. "
                             f"-o sampling=conv -o window=32), got sampling={opts.sampling!r}")
        self.heads = heads
        self.options = asdict(opts)
        self.W_q = nn.Linear(dim, dim)  # shared query/key projection: Q = K (Section 3.1)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        head_dim = dim // heads
        # Learned landmarks: kernel = stride = window, no bias, shared by the heads (Section 4.4).
        sampling, window = opts.sampling, opts.window
        self.conv = nn.Conv1d(head_dim, head_dim, window, stride=window, bias=False) if sampling == "conv" else None
        self.landmark_norm = nn.Sequential(nn.LayerNorm(head_dim), nn.GELU()) if landmark_norm else None
        # Local branch: out + depthwise conv of V along the tokens (the authors' models; not the paper's LRA setting).
        self.v_conv = TokenConv(heads, check_conv_kernel("soft", conv_kernel)) if conv_kernel else None
        self.drop = Dropout(dropout)

    def conv_landmarks(self, q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        b, h, n, d = q.shape
        w = self.options["window"]
        m = math.ceil(n / w)
        x = F.pad(zero_padding(q, mask), (0, 0, 0, m * w - n)).reshape(b * h, m * w, d).transpose(1, 2)
        landmarks = self.conv(x).transpose(1, 2).reshape(b, h, m, d)  # (b, h, m, d)
        if self.landmark_norm is not None:
            # The authors convolve the scaled Q (d^-1/4 Q), then LayerNorm + GELU fix the landmarks' scale.
            # `soft_attention` scales given landmarks by d^-1/4 along with Q, so that is divided out here: the kernel
            # meets them at the LayerNorm's scale, as theirs does.
            landmarks = self.landmark_norm(landmarks * d ** -0.25) * d ** 0.25
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
        return landmarks, F.pad(valid, (0, m * w - n)).view(b, m, w).any(-1)

    def _fixed_draw(self) -> bool:
        # Random landmarks in eval mode come from a generator seeded 0 at every call, not from the global RNG: the
        # same model on the same batch gives one output, so evaluating a checkpoint twice gives one figure.
        return self.options["sampling"] == "random" and not self.training

    def landmarks(self, q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The bottleneck tokens (b, h, m, d) of q (b, h, n, d), unscaled, and their validity (b, m), as this module
        makes them: learned for `conv`, else `sample_landmarks` (which `soft_attention` calls itself when given none),
        `random` ones drawn by seed 0 in eval mode."""
        if self.conv is not None:
            return self.conv_landmarks(q, mask)
        o = self.options
        generator = torch.Generator(device=q.device).manual_seed(0) if self._fixed_draw() else None
        return sample_landmarks(q, mask, sampling=o["sampling"], window=o["window"], num_landmarks=o["num_landmarks"],
                                generator=generator)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        q, v = split_heads(self.W_q(x), self.heads), split_heads(self.W_v(x), self.heads)  # (b, h, n, d)
        landmarks = landmark_mask = None
        if self.conv is not None or self._fixed_draw():
            landmarks, landmark_mask = self.landmarks(q, mask)
        out = soft_attention(q, v, mask, landmarks=landmarks, landmark_mask=landmark_mask, **self.options)
        if self.v_conv is not None:
            out = out + self.v_conv(v, mask)  # (b, h, n, d)
        return self.drop(self.ff(merge_heads(out.to(v.dtype))))
