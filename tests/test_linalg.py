"""The blocked Cholesky factorisation and solve of `inverse="solve"` against torch.linalg's, and the fused SOFT solve
path (which uses them) against the reference path (torch's Cholesky, plain autograd), outputs and gradients."""
import pytest
import torch

from lra_soft.attention import _linalg
from lra_soft.attention.soft import soft_attention


def spd(batch, m, dtype=torch.float64):
    x = torch.randn(*batch, m, m + 3, dtype=dtype)
    return x @ x.transpose(-1, -2) / m + 1e-3 * torch.eye(m, dtype=dtype)


@pytest.mark.parametrize("m, block", [(9, 4), (20, 4), (33, 8), (64, 8)])
def test_blocked_cholesky_equals_torch(m, block):
    A = spd((2, 3), m)
    L, info = _linalg.cholesky(A, block=block)
    assert L.shape == A.shape and (info == 0).all()
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=1e-10, atol=1e-12)  # upper triangle zero too


def test_blocked_cholesky_reports_the_first_failing_pivot():
    A = spd((3,), 20)
    A[1, 13, 13] = -1.0  # the leading 14 x 14 minor is not positive definite
    _, info = _linalg.cholesky(A, block=4)
    _, info_torch = torch.linalg.cholesky_ex(A)
    assert info.tolist() == info_torch.tolist() and info[1] > 0 and info[0] == 0 == info[2]


def test_cho_solve_equals_cholesky_solve():
    A, B = spd((2,), 30), torch.randn(2, 30, 5, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    torch.testing.assert_close(_linalg.cho_solve(L, B), torch.cholesky_solve(B, L), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_solve_with_blocked_factorisation_equals_reference(masked, monkeypatch):
    """m = 40 landmarks with 4-wide blocks: the fused path's own factorisation and solves, forward and backward,
    equal the reference path (torch's Cholesky and cholesky_solve under plain autograd)."""
    monkeypatch.setattr(_linalg, "BLOCK", 4)
    q = torch.randn(2, 2, 80, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 80, 8, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(80) < torch.tensor([[80], [53]])) if masked else None
    g = torch.randn(2, 2, 80, 8, dtype=torch.float64)
    results = []
    for grad in ("analytic", "unrolled"):  # "unrolled" takes the reference path for inverse="solve"
        out = soft_attention(q, v, mask, window=2, inverse="solve", newton_grad=grad)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference, rtol=1e-8, atol=1e-10)


def test_failed_factorisation_is_retried_with_a_larger_ridge(monkeypatch):
    """Identical tokens make A all ones (rank 1): in float32 the factorisation of A + 1e-9 I fails and is retried
    with a larger ridge, for the failed matrices only; the result is finite. With no ridge at all it fails clearly."""
    monkeypatch.setattr(_linalg, "BLOCK", 4)
    calls = []
    factor = _linalg.cholesky
    monkeypatch.setattr(_linalg, "cholesky", lambda A, block=None: calls.append(A.clone()) or factor(A, block))
    same = torch.randn(1, 1, 1, 8).expand(1, 2, 64, 8)
    q = torch.cat([same, torch.randn(1, 2, 64, 8) * 3], 0)  # (2, 2, 64, 8): one degenerate, one fine sequence
    out = soft_attention(q, torch.randn(2, 2, 64, 8), inverse="solve", window=2, ridge=1e-9)
    assert torch.isfinite(out).all() and len(calls) >= 2
    assert torch.equal(calls[1][1], calls[0][1]) and not torch.equal(calls[1][0], calls[0][0])
    with pytest.raises(FloatingPointError, match="failed even with ridge"):
        soft_attention(q, torch.randn(2, 2, 64, 8), inverse="solve", window=2, ridge=0.0)
