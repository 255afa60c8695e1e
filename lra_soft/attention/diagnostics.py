"""Convergence of SOFT's Newton-Raphson inverse (paper Section 4.4, "Newton-Raphson's convergence", Figure 4).

The metric is the paper's: ||A A_k A - A||_2 / ||A||_2 (Proposition 1), on Gaussian-kernel matrices of landmarks
avg-pooled (window 4, the LRA setting) from random tokens of head dim d scaled by d^-1/4, as SOFT builds them.
"""
from __future__ import annotations

import torch

from lra_soft.attention.soft_reference import NEWTON_INIT, gaussian_kernel, newton_inverse, sample_landmarks


def landmark_kernel_matrix(m: int, *, d: int = 32, window: int = 4, batch: int = 4, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, m, m) kernel matrices A = exp(-||l_i - l_j||^2 / (2 sqrt(d))) of avg-pooled N(0, 1) tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, m * window, d, generator=g, dtype=torch.float64).to(dtype) * d ** -0.25
    landmarks, _ = sample_landmarks(q, None, window=window)
    return gaussian_kernel(landmarks, landmarks)[:, 0]


def newton_residual(A: torch.Tensor, iters: int, init: str) -> float:
    """Worst ||A A_k A - A||_2 / ||A||_2 over the batch, measured in float64."""
    Z = newton_inverse(A, iters=iters, init=init).double()
    A = A.double()
    return (torch.linalg.matrix_norm(A @ Z @ A - A, ord=2) / torch.linalg.matrix_norm(A, ord=2)).max().item()


def residual_table(ms=(16, 64, 256, 512), iters=(10, 20, 30), *, d: int = 32, window: int = 4, batch: int = 4,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (m, init): the residual after each iteration count, and the condition number of A."""
    rows = []
    for m in ms:
        A = landmark_kernel_matrix(m, d=d, window=window, batch=batch, seed=seed, dtype=dtype)
        eig = torch.linalg.eigvalsh(A.double())
        cond = (eig[..., -1] / eig[..., 0].clamp_min(1e-300)).max().item()
        for init in NEWTON_INIT:
            rows.append({"m": m, "init": init, "cond": cond,
                         **{f"iters={k}": newton_residual(A, k, init) for k in iters}})
    return rows
