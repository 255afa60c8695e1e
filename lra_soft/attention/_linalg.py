"""Batched Cholesky factorisation and solves for SOFT's `inverse="solve"` (the exact alternative to Algorithm 2).

torch.linalg.cholesky_ex on CPU factors each matrix with LAPACK and then zeroes the upper triangle of the whole batch
in a slow strided pass; for 16 matrices of 1024 x 1024 that zeroing costs more than the factorisation (measured in
the CPU speed work: 0.14 s in all, 0.11 s of it in `tril`). `cholesky` below is a left-looking blocked factorisation whose work
is batched matrix products, with torch's own factorisation on the small diagonal blocks only: block column k is

    L[k:, k] = A[k:, k] - L[k:, :k] L[k, :k]^T,   L[k, k] = chol(that block),   L[k+1:, k] = (...) L[k, k]^-T

It is used on CPU for matrices larger than two blocks; elsewhere (cuSOLVER's batched potrf) torch's is used as is.
`cho_solve` applies (L L^T)^-1 by two triangular solves, which on CPU is about 3x faster than torch.cholesky_solve
(which copies both operands into column-major buffers first).
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 64  # diagonal block size of the CPU factorisation (a sweep of 64 / 128 / 256 at m = 1024: 64 was fastest)


def cholesky(A: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors L (..., m, m) of the symmetric positive definite A, and `info` (...,): nonzero where
    the factorisation failed (as torch.linalg.cholesky_ex). Only the lower triangle of A is read."""
    m, block = A.shape[-1], block or BLOCK
    if A.device.type != "cpu" or m <= 2 * block or A.dim() < 3:
        return torch.linalg.cholesky_ex(A)
    batch = A.shape[:-2]
    A3 = A.reshape(-1, m, m)
    L = torch.empty_like(A3)
    info = torch.zeros(A3.shape[0], dtype=torch.int32, device=A.device)
    for k in range(0, m, block):
        e = min(k + block, m)
        panel = A3[:, k:, k:e]  # (B, m - k, w): this block column, from the diagonal down
        if k:
            panel = torch.baddbmm(panel, L[:, k:, :k], L[:, k:e, :k].transpose(-1, -2), alpha=-1.0)
        L_kk, info_k = torch.linalg.cholesky_ex(panel[:, : e - k])  # (B, w, w), lower, upper triangle zero
        info = torch.where((info == 0) & (info_k > 0), info_k + k, info)  # first failing pivot, as LAPACK's
        L[:, k:e, k:e] = L_kk
        L[:, :k, k:e] = 0.0
        if e < m:
            L[:, e:, k:e] = torch.linalg.solve_triangular(L_kk.transpose(-1, -2), panel[:, e - k:], upper=True,
                                                          left=False)
    return L.view(*batch, m, m), info.view(batch)


def cho_solve(L: Tensor, B: Tensor) -> Tensor:
    """(L L^T)^-1 B for lower-triangular L (..., m, m) and B (..., m, k)."""
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)
