"""SOFT against its exact references: torch.linalg.pinv for the Newton inverse, exact Gaussian-kernel attention for the
Nystrom product, autograd through the iterations for the analytic backward, and gradcheck in float64."""
import pytest
import torch

from lra_soft.attention import build_attention
from lra_soft.attention.gaussian import gaussian_attention
from lra_soft.attention.soft import (gaussian_kernel, newton_alpha, newton_inverse, newton_inverse_unrolled,
                                     sample_landmarks, soft_attention)


def landmark_matrix(m, d=32, window=4, batch=2, heads=2, dtype=torch.float64):
    """Gaussian-kernel matrix of avg-pooled random tokens, as SOFT builds it on LRA (window 4)."""
    q = torch.randn(batch, heads, m * window, d, dtype=dtype) * d ** -0.25
    landmarks, _ = sample_landmarks(q, None, window=window)
    return gaussian_kernel(landmarks, landmarks)


def rel_residual(A, Z, ord="fro"):
    """||A Z A - A|| / ||A|| (Proposition 1; the paper's Figure 4 uses ord=2), worst matrix of the batch. Prop. 1's
    proof holds in any submultiplicative norm, so the cheaper Frobenius norm is the default here."""
    return (torch.linalg.matrix_norm(A @ Z @ A - A, ord=ord) / torch.linalg.matrix_norm(A, ord=ord)).max().item()


@pytest.mark.parametrize("m", [16, 64, 256, 512])
@pytest.mark.parametrize("init", ["paper", "spectral"])
def test_newton_converges_to_pinv(m, init):
    A = landmark_matrix(m)
    Z = newton_inverse(A, iters=45, init=init)
    torch.testing.assert_close(Z, torch.linalg.pinv(A, hermitian=True), rtol=1e-6, atol=1e-6 * Z.abs().max().item())


def test_newton_residual_decreases_monotonically():
    """Proposition 1: ||A A_k A - A|| decreases monotonically, with the paper's initialisation."""
    A = landmark_matrix(128, batch=1)
    residuals = [rel_residual(A, newton_inverse(A, iters=k)) for k in range(0, 40)]
    converging = [(a, b) for a, b in zip(residuals, residuals[1:]) if a > 1e-12]  # above float64 rounding
    assert len(converging) > 20 and all(b < a for a, b in converging), residuals
    assert max(residuals[-5:]) < 1e-12


def test_spectral_init_converges_sooner():
    A = landmark_matrix(128, batch=1)
    paper, spectral = rel_residual(A, newton_inverse(A, 25)), rel_residual(A, newton_inverse(A, 25, "spectral"))
    assert spectral < paper / 10, (paper, spectral)


def test_alpha_is_per_matrix():
    """One alpha per (batch, head): a very different neighbour must not change another matrix's inverse."""
    A = landmark_matrix(32, batch=1, heads=1)
    other = 50 * torch.ones_like(A) + torch.eye(32, dtype=A.dtype)
    alone = newton_inverse(A)
    batched = newton_inverse(torch.cat([A, other]))
    assert newton_alpha(torch.cat([A, other]))[0].flatten().unique().numel() == 2
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_singular_inputs_stay_finite(dtype):
    """Duplicate tokens give identical landmarks: A is rank-deficient (all-ones blocks). No NaN, no inf."""
    q = torch.randn(2, 2, 1, 8, dtype=dtype).expand(2, 2, 64, 8).contiguous()
    v = torch.randn(2, 2, 64, 8, dtype=dtype)
    for inverse in ["newton", "solve", "pinv"]:
        out = soft_attention(q, v, inverse=inverse)
        assert torch.isfinite(out).all(), inverse
    A = torch.ones(3, 16, 16, dtype=dtype)
    assert torch.isfinite(newton_inverse(A)).all()
    torch.testing.assert_close(newton_inverse(A, iters=40), torch.linalg.pinv(A), rtol=1e-4, atol=1e-5)


def test_two_landmarks_converge():
    """Every 2 x 2 kernel matrix has lambda_max = ||A||_1, the boundary of the paper's alpha; it must still converge."""
    A = torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(newton_inverse(A, iters=20), torch.linalg.inv(A))


def test_analytic_backward_matches_autograd_through_iterations():
    A = landmark_matrix(48).requires_grad_()
    G = torch.randn_like(A)
    (grad_analytic,) = torch.autograd.grad((newton_inverse(A, iters=40) * G).sum(), A)
    (grad_unrolled,) = torch.autograd.grad((newton_inverse_unrolled(A, iters=40) * G).sum(), A)
    torch.testing.assert_close(grad_analytic, grad_unrolled, rtol=1e-6, atol=1e-6 * grad_unrolled.abs().max().item())


def test_analytic_backward_inside_soft_matches_unrolled():
    q = torch.randn(2, 2, 64, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 64, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for newton_grad in ["analytic", "unrolled"]:
        out = soft_attention(q, v, window=4, iters=50, newton_grad=newton_grad)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8, dtype=out.dtype)).sum(), (q, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("inverse", ["newton", "solve", "pinv"])
def test_window_one_equals_exact_gaussian_attention(inverse):
    """Every token a landmark: P = A = S, so S A^+ S V = S V exactly (outputs and gradients)."""
    q = (2 * torch.randn(2, 2, 24, 8, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 2, 24, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 15:] = False
    out = soft_attention(q, v, mask, window=1, inverse=inverse, iters=60, ridge=0.0)
    ref = gaussian_attention(q, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, v)), torch.autograd.grad((ref * g).sum(), (q, v))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_module_window_one_equals_gaussian_module():
    soft = build_attention("soft", 32, 2, max_len=64, window=1, iters=60).double()
    exact = build_attention("gaussian", 32, 2, max_len=64).double()
    exact.load_state_dict(soft.state_dict())
    x = torch.randn(3, 20, 32, dtype=torch.float64) * 3
    mask = torch.arange(20) < torch.tensor([[20], [13], [1]])
    torch.testing.assert_close(soft(x, mask), exact(x, mask), rtol=1e-8, atol=1e-8)
    soft(x, mask).square().sum().backward()
    exact(x, mask).square().sum().backward()
    for (name, p), e in zip(soft.named_parameters(), exact.parameters()):
        torch.testing.assert_close(p.grad, e.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_inverses_agree_on_well_conditioned_inputs():
    """Spread-out tokens make A well conditioned: Newton (20 iterations), Cholesky solve and pinv agree."""
    q = 4 * torch.randn(2, 2, 96, 16)
    v = torch.randn(2, 2, 96, 16)
    outs = {inv: soft_attention(q, v, window=8, inverse=inv) for inv in ["newton", "solve", "pinv"]}
    torch.testing.assert_close(outs["newton"], outs["pinv"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["solve"], outs["pinv"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(window=3), dict(num_landmarks=4), dict(sampling="first", num_landmarks=3), dict(sampling="first"),
    dict(window=2, inverse="solve", ridge=0.0), dict(window=2, inverse="pinv"), dict(window=2, newton_grad="unrolled"),
])
def test_gradcheck_float64(options):
    q = (1.5 * torch.randn(2, 1, 11, 3, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 1, 11, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(11) < torch.tensor([[11], [7]])
    options.setdefault("iters", 80)
    assert torch.autograd.gradcheck(lambda q, v: soft_attention(q, v, mask, **options), (q, v), fast_mode=True)


@pytest.mark.parametrize("options", [dict(), dict(num_landmarks=5), dict(sampling="first"), dict(inverse="solve"),
                                     dict(sampling="first", num_landmarks=4), dict(sampling="conv")])
def test_padding_invariance(options):
    """Outputs at valid positions ignore how much padding follows and what it holds."""
    attn = build_attention("soft", 32, 2, max_len=128, **options).eval()
    x = torch.randn(2, 30, 32)
    mask = torch.arange(30) < torch.tensor([[30], [17]])
    padded = torch.cat([x, 5 * torch.randn(2, 33, 32)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 33, dtype=torch.bool)], dim=1)
    noisy = torch.where(mask[..., None], x, 5 * torch.randn_like(x))
    ref = attn(x, mask)
    torch.testing.assert_close(attn(padded, padded_mask)[:, :30][mask], ref[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(attn(noisy, mask)[mask], ref[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(attn(x[1:, :17]), ref[1:, :17], rtol=0, atol=1e-5)


def test_random_sampling_uses_only_valid_tokens():
    q = torch.randn(1, 1, 40, 8)
    mask = torch.arange(40)[None] < 10
    q[:, :, 10:] = 1e6  # a padded token picked as landmark would blow up the output
    out = soft_attention(q, torch.randn(1, 1, 40, 8), mask, sampling="random", num_landmarks=6)
    assert torch.isfinite(out).all() and out[:, :, 10:].abs().max() == 0


def test_bf16_autocast_keeps_float32_internals():
    attn = build_attention("soft", 64, 2, max_len=256)
    x = torch.randn(2, 100, 64)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    # only the bf16 projections differ; the kernel and the inverse ran in float32
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_landmark_counts():
    q = torch.randn(2, 1, 10, 4)
    mask = torch.arange(10) < torch.tensor([[10], [5]])
    landmarks, valid = sample_landmarks(q, mask, window=4)
    assert landmarks.shape == (2, 1, 3, 4) and valid.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(landmarks[1, 0, 1], q[1, 0, 4])  # window [4, 8) holds one valid token
    landmarks, valid = sample_landmarks(q, mask, num_landmarks=4)
    assert valid.tolist() == [[True] * 4, [True, True, True, True]]
    landmarks, valid = sample_landmarks(q, mask, num_landmarks=7)
    assert valid[1].sum() == 5  # five valid tokens fill at most five segments


def test_conv_sampling_learns():
    attn = build_attention("soft", 32, 2, max_len=64, sampling="conv", window=4)
    attn(torch.randn(2, 18, 32)).sum().backward()
    assert attn.conv.weight.grad is not None and attn.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, message", [
    (dict(sampling="max"), "choose from"), (dict(inverse="svd"), "choose from"), (dict(window=0), "window"),
    (dict(num_landmarks=0), "num_landmarks"), (dict(newton_init="x"), "choose from"), (dict(iters=-1), "iters"),
])
def test_bad_options_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        soft_attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), **bad)
    with pytest.raises(ValueError, match=message):
        build_attention("soft", 8, 2, max_len=8, **bad)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="square"):
        newton_inverse(torch.randn(3, 4))
    with pytest.raises(ValueError, match="mask"):
        soft_attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.ones(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("options", [dict(), dict(num_landmarks=8), dict(inverse="solve")])
def test_torch_compile_fullgraph(options):
    """No graph breaks (fullgraph=True) and the same outputs and gradients. aot_eager traces forward and the custom
    backward exactly as inductor would receive them, without the minute of CPU code generation."""
    q = torch.randn(2, 2, 40, 8, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, requires_grad=True)
    mask = torch.arange(40) < torch.tensor([[40], [23]])
    fn = lambda q, v: soft_attention(q, v, mask, **options)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ref, out = fn(q, v), compiled(q, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(ref.sum(), (q, v)), torch.autograd.grad(out.sum(), (q, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 5e-5)])
def test_inference_product_form_equals_algorithm_2(dtype, tol):
    """Without gradients, A_T W is computed as A_0 prod_k (2I - T_k) W: Algorithm 2's result at half the products."""
    q = torch.randn(2, 2, 512, 32, dtype=dtype)
    v = torch.randn(2, 2, 512, 32, dtype=dtype)
    with torch.no_grad():
        fast = soft_attention(q, v)
    algorithm_2 = soft_attention(q.requires_grad_(), v).detach()
    assert ((fast - algorithm_2).abs().max() / algorithm_2.abs().max()).item() < tol


@pytest.mark.parametrize("options", [dict(), dict(inverse="solve"), dict(num_landmarks=6)])
def test_blocked_kernel_equals_one_block(options, monkeypatch):
    """The CPU blocking over tokens (cache-sized blocks of P) changes nothing: outputs and gradients."""
    import lra_soft.attention.soft as soft

    q = torch.randn(2, 2, 50, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 50, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(50) < torch.tensor([[50], [31]])
    g = torch.randn(2, 2, 50, 8, dtype=torch.float64)
    results = []
    for elements, minimum in [(1 << 20, 256), (64, 7)]:  # one block; blocks of 7 tokens (the last one shorter)
        monkeypatch.setattr(soft, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(soft, "MIN_CHUNK", minimum)
        out = soft_attention(q, v, mask, iters=30, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(inverse="solve"), dict(num_landmarks=6)])
def test_head_split_layout_is_kept_and_changes_nothing(options):
    """q, v as head-split views of (b, n, h, d) memory give the same outputs and gradients as contiguous copies, and
    the output and gradients keep that memory layout (so merging the heads back costs no copy)."""
    x = torch.randn(2, 40, 2, 8, dtype=torch.float64)  # (b, n, h, d)
    mask = torch.arange(40) < torch.tensor([[40], [23]])
    g = torch.randn(2, 2, 40, 8, dtype=torch.float64)
    results = []
    for split in (True, False):
        q = x.clone().requires_grad_()
        v = (2 * x).clone().requires_grad_()
        qh, vh = q.transpose(1, 2), v.transpose(1, 2)  # (b, h, n, d) views
        out = soft_attention(qh if split else qh.contiguous(), vh if split else vh.contiguous(), mask, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
        if split:
            assert out.transpose(1, 2).is_contiguous()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(inverse="solve"), dict(num_landmarks=6), dict(sampling="first")])
def test_nan_in_padding_does_not_leak(options):
    """Whatever padded rows hold (here NaN and inf) changes nothing at valid positions, in outputs or gradients."""
    mask = torch.arange(40) < torch.tensor([[40], [23]])
    q0, v0 = torch.randn(2, 2, 40, 8, dtype=torch.float64), torch.randn(2, 2, 40, 8, dtype=torch.float64)
    g = torch.randn(2, 2, 40, 8, dtype=torch.float64)
    results = []
    for junk in (0.0, float("nan"), float("inf")):
        q = q0.masked_fill(~mask[:, None, :, None], junk).requires_grad_()
        v = v0.masked_fill(~mask[:, None, :, None], junk).requires_grad_()
        out = soft_attention(q, v, mask, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
