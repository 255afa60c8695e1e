"""Algorithm 2 in spectral form (`soft_fused._newton_spectrum`, the CPU path for m >= 256): A_T from one
eigendecomposition, against Algorithm 2 iterated: the matrices themselves, unconverged ones included; the fused
product's outputs and landmark, q and v gradients in float64 with padding masks and empty landmarks; float32 accuracy
on realistic kernel matrices; the benchmark's FLOP count of it. Small sizes force the spectral path by lowering
`SPECTRAL_MIN_LANDMARKS`."""
import pytest
import torch

from lra_soft.attention import soft_fused, soft_reference
from lra_soft.attention.soft import soft_attention
from lra_soft.attention.soft_fused import soft_product
from lra_soft.attention.soft_reference import (SoftOptions, _newton_iterate, gaussian_kernel, newton_alpha,
                                               newton_alpha_symmetric, sample_landmarks, soft_attention_reference,
                                               soft_product_reference)
from lra_soft.bench import count_flops
from tests.test_soft_fused import product_inputs  # the same masked inputs, empty landmarks included


@pytest.fixture
def spectral(monkeypatch):
    """Every fused training product takes the spectral path, whatever m."""
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 1)


@pytest.fixture
def analytic_reference(monkeypatch):
    """The reference product with Algorithm 2's analytic inverse gradient (`newton_inverse`, what the fused product
    differentiates) instead of autograd through the iterations: the two differ until the iteration has converged."""
    monkeypatch.setattr(soft_reference, "newton_inverse_unrolled", soft_reference.newton_inverse)


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def kernel_matrices(m, n_empty=0, batch=2, d=8, dtype=torch.float64):
    """Gaussian-kernel landmark matrices as SOFT builds them (window-4 means of unit-scale tokens, scaled by d^-1/4),
    the last `n_empty` landmarks of each made empty (identity rows and columns)."""
    q = torch.randn(batch, 1, 4 * m, d, dtype=dtype) * d ** -0.25
    landmarks, _ = sample_landmarks(q, window=4)
    A = gaussian_kernel(landmarks, landmarks)
    if n_empty:
        A[..., m - n_empty:, :] = 0
        A[..., :, m - n_empty:] = 0
        A[..., range(m - n_empty, m), range(m - n_empty, m)] = 1
    return A


@pytest.mark.parametrize("init", ["paper", "spectral"])
@pytest.mark.parametrize("iters", [0, 1, 4, 12, 40])
def test_spectrum_is_algorithm_2(iters, init):
    """V diag(p) V^T equals Algorithm 2's A_T after the same number of iterations, converged or not (at 4 and 12
    iterations A_T is still far from A^-1: the test would see any shortcut to the inverse)."""
    A = kernel_matrices(48, n_empty=3)
    V, p = soft_fused._newton_spectrum(A, iters, init)
    Z = _newton_iterate(A, iters, init, nonnegative=True)
    assert relative(V @ torch.diag_embed(p) @ V.transpose(-1, -2), Z) < 1e-10
    if iters in (4, 12):
        assert relative(Z, torch.linalg.inv(A)) > 1e-2


def test_alpha_without_the_product_is_the_papers():
    """The paper's alpha from diag(A A) and A (A 1) (O(m^2)) is the one found with A A, for matrices whose search
    stops at different i (a near-diagonal one, a near-constant one, two kernel matrices)."""
    m = 32
    A = torch.cat([kernel_matrices(m), torch.eye(m, dtype=torch.float64)[None, None] + 1e-3,
                   0.9 * torch.ones(1, 1, m, m, dtype=torch.float64) + 0.1 * torch.eye(m, dtype=torch.float64)])
    alpha = newton_alpha_symmetric(A)
    assert alpha.unique().numel() >= 3
    torch.testing.assert_close(alpha, newton_alpha(A, nonnegative=True)[0], rtol=0, atol=0)


def product_and_gradients(product, landmarks, q, v, mask, landmark_mask, scale, options, g):
    inputs = [t.clone().requires_grad_() for t in (landmarks, q, v)]
    out = product(*inputs, mask, landmark_mask, scale, options)
    return (out, *torch.autograd.grad((out * g).sum(), inputs))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("iters", [5, 20])
def test_spectral_product_equals_algorithm_2(iters, masked, spectral, analytic_reference):
    """Outputs and landmark, q and v gradients of the fused product on the spectral path equal the plain-autograd
    reference's with Algorithm 2 iterated, at iteration counts where it has not converged."""
    inputs = product_inputs(masked)
    g = torch.randn_like(inputs[1])
    options = SoftOptions(iters=iters)
    fused = product_and_gradients(soft_product, *inputs, options, g)
    reference = product_and_gradients(soft_product_reference, *inputs, options, g)
    for name, a, b in zip(["out", "d_landmarks", "dq", "dv"], fused, reference):
        assert relative(a, b) < 1e-10, name


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_spectral_product_equals_unrolled_reference_once_converged(masked, spectral):
    """Against `soft_product_reference` as it is (autograd through all 60 iterations): equal once Algorithm 2 has
    converged, where the analytic inverse gradient is the gradient of the iteration."""
    inputs = product_inputs(masked)
    g = torch.randn_like(inputs[1])
    options = SoftOptions(iters=60)
    fused = product_and_gradients(soft_product, *inputs, options, g)
    reference = product_and_gradients(soft_product_reference, *inputs, options, g)
    for name, a, b in zip(["out", "d_landmarks", "dq", "dv"], fused, reference):
        assert relative(a, b) < 1e-10, name


@pytest.mark.parametrize("options", [dict(), dict(num_landmarks=6)], ids=["avgpool-window-4", "num_landmarks"])
def test_spectral_soft_attention_equals_its_reference(options, spectral, analytic_reference):
    """End to end (landmarks sampled from q, so dq runs through A too), with a padding mask that empties landmarks,
    at the default 20 iterations."""
    q = torch.randn(2, 2, 41, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 41, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(41) < torch.tensor([[41], [26]])  # 11 window-4 landmarks, 4 of them empty in sequence 2
    g = torch.randn(2, 2, 41, 8, dtype=torch.float64)
    results = []
    for fn in (soft_attention, soft_attention_reference):
        out = fn(q, v, mask, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for name, a, b in zip(["out", "dq", "dv"], *results):
        assert relative(a, b) < 1e-10, name


def test_empty_landmarks_change_nothing(spectral):
    """Identity rows and columns leave the valid block's A_T as it is: a sequence with three empty landmarks gives
    the outputs and gradients of the same sequence with only its seven valid landmarks."""
    landmarks, q, v, mask, landmark_mask, scale = product_inputs(masked=True)
    g = torch.randn_like(q)
    options = SoftOptions()
    one = slice(1, 2)  # the second sequence: 21 valid tokens, landmarks 7..9 empty
    with_empty = product_and_gradients(soft_product, landmarks[one], q[one], v[one], mask[one], landmark_mask[one],
                                       scale, options, g[one])
    valid = product_and_gradients(soft_product, landmarks[one, :, :7], q[one], v[one], mask[one],
                                  landmark_mask[one, :7], scale, options, g[one])
    for name, a, b in zip(["out", "d_landmarks", "dq", "dv"], with_empty, valid):
        if name == "d_landmarks":
            assert a[..., 7:, :].abs().max() == 0
            a = a[..., :7, :]
        assert relative(a, b) < 1e-12, name


def test_float32_spectrum_is_more_accurate_than_the_iteration():
    """On realistic landmark matrices (m = 512, badly conditioned), float32 A_T W against
    float64 Algorithm 2. The decomposition runs in float64 (`_eigh`), so what remains is the float32 rounding of A,
    W and the result: measured 1e-7 (float32 Algorithm 2: 1.0-1.3e-6; a float32 decomposition: 0.9-1.4e-5). 5e-7 is
    4 float32 epsilons."""
    q = torch.randn(1, 2, 2048, 32, dtype=torch.float64)
    landmarks = sample_landmarks(q, window=4)[0] * 32 ** -0.25
    A = gaussian_kernel(landmarks, landmarks)  # (1, 2, 512, 512)
    W = gaussian_kernel(landmarks, q * 32 ** -0.25) @ torch.randn_like(q)  # (1, 2, 512, 32)
    exact = _newton_iterate(A, 20, "paper", nonnegative=True) @ W
    spectral = soft_fused._spectral_apply(*soft_fused._newton_spectrum(A.float(), 20, "paper"), W.float())
    assert spectral.dtype == torch.float32
    assert relative(spectral.double(), exact) < 5e-7


def test_float32_training_step_agrees_with_float64(monkeypatch):
    """The float32 fused product at n = 2048 (m = 512: the spectral path) against float64 Algorithm 2 iterated:
    outputs, dq and dv within 2e-6 relative. Measured (n = 1024..4096, two seeds): at most 5.7e-7 on this path and
    8.1e-7 on the iterated float32 one, from the float32 kernel products both share; 2e-6 leaves a factor 2.5."""
    q = torch.randn(1, 2, 2048, 32, dtype=torch.float64)
    v, g = torch.randn_like(q), torch.randn_like(q)

    def step(q, v, g):
        q, v = q.clone().requires_grad_(), v.clone().requires_grad_()
        out = soft_attention(q, v)
        return [t.double() for t in (out, *torch.autograd.grad((out * g).sum(), (q, v)))]

    single = step(q.float(), v.float(), g.float())
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 10**9)  # the reference: the iteration itself
    exact = step(q, v, g)
    for name, a, b in zip(["out", "dq", "dv"], single, exact):
        assert relative(a, b) < 2e-6, name


def test_benchmark_counts_the_decomposition():
    """`count_flops` (the benchmark's GFLOP and GFLOP/s) includes the eigendecompositions at LAPACK's count, also
    those `_eigh` would run on other threads, which the counter would not see."""
    A = kernel_matrices(20)  # (2, 1, 20, 20)
    each = 14 * 20**3 // 3
    assert count_flops(lambda: torch.linalg.eigh(A)) == 2 * each
    assert count_flops(lambda: soft_fused._eigh(A)) == 2 * each


@pytest.mark.slow  # torch.compile
def test_spectral_path_compiles_fullgraph(spectral):
    """No graph breaks (the thread count is left alone while compiling) and the same outputs and gradients."""
    q = torch.randn(2, 2, 40, 8, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, requires_grad=True)
    mask = torch.arange(40) < torch.tensor([[40], [23]])
    fn = lambda q, v: soft_attention(q, v, mask)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ref, out = fn(q, v), compiled(q, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(ref.sum(), (q, v)), torch.autograd.grad(out.sum(), (q, v))):
        torch.testing.assert_close(a, b)
