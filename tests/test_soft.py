"""SOFT against its exact references: torch.linalg.pinv for the Newton inverse, exact Gaussian-kernel attention for the
Nystrom product, autograd through the iterations for the analytic backward, and gradcheck in float64. The fused CPU
product has its own file, tests/test_soft_fused.py."""
import dataclasses
import inspect

import pytest
import torch

from lra_soft.attention import attention_options, build_attention
from lra_soft.attention.gaussian import gaussian_attention
from lra_soft.attention._common import merge_heads, split_heads
from lra_soft.attention.soft import SoftAttention, soft_attention
from lra_soft.attention.soft_reference import (SoftOptions, gaussian_kernel, newton_alpha, newton_inverse,
                                               newton_inverse_unrolled, sample_landmarks, soft_attention_reference)


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


@pytest.mark.parametrize("fn", [soft_attention, soft_attention_reference])
@pytest.mark.parametrize("inverse", ["newton", "solve", "pinv"])
def test_window_one_equals_exact_gaussian_attention(inverse, fn):
    """Every token a landmark: P = A = S, so S A^+ S V = S V exactly (outputs and gradients)."""
    q = (2 * torch.randn(2, 2, 24, 8, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 2, 24, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 15:] = False
    out = fn(q, v, mask, window=1, inverse=inverse, iters=60, ridge=0.0)
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


def test_random_landmarks_are_one_fixed_draw_in_eval_mode_and_new_draws_in_training():
    attn = build_attention("soft", 32, 2, max_len=128, sampling="random", num_landmarks=8)
    x = torch.randn(2, 60, 32)
    mask = torch.arange(60) < torch.tensor([[60], [41]])
    torch.manual_seed(0)
    train = [attn(x, mask) for _ in range(2)]
    assert not torch.equal(train[0], train[1])  # training: a new draw at every call
    attn.eval()
    state = torch.get_rng_state()
    first = attn(x, mask)
    assert torch.equal(torch.get_rng_state(), state)  # eval leaves the global RNG alone
    torch.manual_seed(123)
    assert torch.equal(attn(x, mask), first)  # and gives one output, whatever the global RNG
    # the fixed draw is the seed-0 draw of `sample_landmarks`, through `soft_attention`'s own arithmetic
    q, v = split_heads(attn.W_q(x), 2), split_heads(attn.W_v(x), 2)
    landmarks, landmark_mask = sample_landmarks(q, mask, sampling="random", num_landmarks=8,
                                                generator=torch.Generator().manual_seed(0))
    out = soft_attention(q, v, mask, landmarks=landmarks, landmark_mask=landmark_mask, **attn.options)
    torch.testing.assert_close(attn.ff(merge_heads(out)), first, rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(inverse="solve"), dict(inverse="pinv")])
def test_bf16_autocast_keeps_float32_internals(options):
    """Under bf16 autocast the kernel and the inverse still run in float32: float32 inputs give bit for bit the
    output of a call without autocast, and bf16 inputs that of their float32 upcast, rounded to bf16 at the end."""
    q, v = torch.randn(2, 2, 100, 32), torch.randn(2, 2, 100, 32)
    mask = torch.arange(100) < torch.tensor([[100], [61]])
    ref = soft_attention(q, v, mask, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_attention(q, v, mask, **options)
        out_bf16 = soft_attention(q.bfloat16(), v.bfloat16(), mask, **options)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    upcast = soft_attention(q.bfloat16().float(), v.bfloat16().float(), mask, **options)
    assert out_bf16.dtype == torch.bfloat16 and torch.equal(out_bf16, upcast.bfloat16())


def test_bf16_autocast_module():
    attn = build_attention("soft", 64, 2, max_len=256)
    x = torch.randn(2, 100, 64)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()  # only the bf16 projections differ


def test_options_are_declared_once():
    """SoftOptions is the one declaration: the module's constructor, both functions and the registry list its fields
    with its defaults, and `SoftAttention.options` holds exactly them. The module adds one option of its own, the
    convolution of V and the landmarks' normalisation, which hold parameters and so are no options of the functions."""
    defaults = dataclasses.asdict(SoftOptions())
    assert attention_options("soft") == {**defaults, "landmark_norm": False, "conv_kernel": 0}
    for fn in (soft_attention, soft_attention_reference, SoftAttention.__init__):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults, fn
    assert build_attention("soft", 8, 2, max_len=8, iters=3).options == {**defaults, "iters": 3}
    with pytest.raises(TypeError, match="no_such_option"):
        soft_attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), no_such_option=1)


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


def _conv_reference(v, weight, mask):
    """The depthwise convolution of V written out: out[b, h, i] = sum_t w[h, t] v[b, h, i + t - k // 2], padded
    tokens and the ends of the sequence read as zero."""
    b, h, n, d = v.shape
    k = weight.shape[2]
    v = v * mask[:, None, :, None]
    out = torch.zeros_like(v)
    for t in range(k):
        shift = t - k // 2
        lo, hi = max(0, -shift), min(n, n - shift)
        out[:, :, lo:hi] += weight[:, 0, t, 0][None, :, None, None] * v[:, :, lo + shift:hi + shift]
    return out


def _assert_same_on_valid_tokens(module, ours, ref, mask, *, out_tol, grad_tol):
    """Outputs on valid tokens and every parameter's gradient agree (rtol, atol); returns our gradients."""
    valid = mask[..., None]
    torch.testing.assert_close(ours * valid, ref * valid, rtol=out_tol[0], atol=out_tol[1])
    grad_out = torch.randn_like(ours) * valid
    ours_grads = torch.autograd.grad((ours * grad_out).sum(), list(module.parameters()))
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), list(module.parameters()))
    for (name, _), a, c in zip(module.named_parameters(), ours_grads, ref_grads):
        torch.testing.assert_close(a, c, rtol=grad_tol[0], atol=grad_tol[1], msg=name)
    return ours_grads


def test_v_convolution_is_the_written_out_convolution_added_to_the_output():
    """conv_kernel=k adds the depthwise convolution of V (one k-tap filter per head) to SOFT's output before the
    output projection; outputs and the gradients of every parameter equal the written-out formula's (with the exact
    inverse, so that only the convolution is under test; the inverses have their own tests above)."""
    torch.manual_seed(0)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    mask = torch.arange(23) < torch.tensor([[23], [14]])
    with_conv = build_attention("soft", 16, 2, max_len=32, num_landmarks=4, inverse="pinv", conv_kernel=5).double()
    assert tuple(with_conv.v_conv.weight.shape) == (2, 1, 5, 1)
    with torch.no_grad():
        with_conv.v_conv.weight.normal_()

    def reference(x):
        q = with_conv.W_q(x).view(2, 23, 2, 8).transpose(1, 2)  # (b, h, n, d)
        v = with_conv.W_v(x).view(2, 23, 2, 8).transpose(1, 2)
        out = soft_attention_reference(q, v, mask, **with_conv.options) + _conv_reference(v, with_conv.v_conv.weight,
                                                                                          mask)
        return with_conv.ff(out.transpose(1, 2).reshape(2, 23, 16))

    ours_grads = _assert_same_on_valid_tokens(with_conv, with_conv(x, mask), reference(x), mask,
                                              out_tol=(1e-9, 1e-9), grad_tol=(1e-8, 1e-9))
    assert ours_grads[-1].abs().sum() > 0  # the filter learns

    without = build_attention("soft", 16, 2, max_len=32, num_landmarks=4, inverse="pinv").double()
    assert without.v_conv is None and not any("v_conv" in k for k in without.state_dict())
    without.load_state_dict({k: v for k, v in with_conv.state_dict().items() if not k.startswith("v_conv")})
    with torch.no_grad():
        with_conv.v_conv.weight.zero_()
    torch.testing.assert_close(with_conv(x, mask), without(x, mask))
    for bad in (4, -1):
        with pytest.raises(ValueError, match="soft conv_kernel must be 0 .* or odd"):
            build_attention("soft", 16, 2, max_len=32, conv_kernel=bad)


def test_landmark_norm_is_the_authors_landmarks_in_the_kernel_written_out():
    """landmark_norm=True: landmarks L = GELU(LN(conv(d^-1/4 Q))) meet the kernel at that scale, unscaled:
    out = exp(-|sQ - L|^2 / 2) A^+ exp(-|L - sQ|^2 / 2) V with A = exp(-|L - L|^2 / 2), s = d^-1/4 (the authors'
    code). Outputs and every parameter's gradient equal this formula written out with torch.linalg.pinv."""
    torch.manual_seed(0)
    b, n, h, d, w = 2, 22, 2, 8, 4
    x = torch.randn(b, n, h * d, dtype=torch.float64)
    mask = torch.arange(n) < torch.tensor([[n], [13]])
    attn = build_attention("soft", h * d, h, max_len=32, sampling="conv", window=w, inverse="pinv",
                           landmark_norm=True).double()
    with torch.no_grad():  # LayerNorm's affine away from (1, 0), so that a wrong order or scale shows
        attn.landmark_norm[0].weight.uniform_(0.5, 1.5)
        attn.landmark_norm[0].bias.normal_(0, 0.3)

    def kernel(a, c):  # exp(-|a_i - c_j|^2 / 2), (..., i, j)
        return torch.exp(-0.5 * ((a[..., :, None, :] - c[..., None, :, :]) ** 2).sum(-1))

    def reference(x):
        s = d ** -0.25
        q = attn.W_q(x).view(b, n, h, d).transpose(1, 2) * mask[:, None, :, None] * s  # (b, h, n, d), scaled
        v = attn.W_v(x).view(b, n, h, d).transpose(1, 2) * mask[:, None, :, None]
        m = -(-n // w)
        padded = torch.cat([q, q.new_zeros(b, h, m * w - n, d)], dim=2)                  # (b, h, m w, d)
        conv = attn.conv.weight                                                          # (d_out, d_in, w)
        L = torch.einsum("bhmtc,oct->bhmo", padded.view(b, h, m, w, d), conv)          # (b, h, m, d)
        L = torch.nn.functional.gelu(attn.landmark_norm[0](L))
        valid = torch.cat([mask, mask.new_zeros(b, m * w - n)], 1).view(b, m, w).any(-1)  # (b, m)
        out = torch.zeros_like(v)
        for i in range(b):
            keep = valid[i]
            Li = L[i][:, keep]                                                             # (h, m_i, d)
            out[i] = kernel(q[i], Li) @ torch.linalg.pinv(kernel(Li, Li)) @ (kernel(Li, q[i]) @ v[i])
        out = out * mask[:, None, :, None]
        return attn.ff(out.transpose(1, 2).reshape(b, n, h * d))

    grads = _assert_same_on_valid_tokens(attn, attn(x, mask), reference(x), mask,
                                         out_tol=(1e-8, 1e-10), grad_tol=(1e-7, 1e-9))
    for (name, _), g in zip(attn.named_parameters(), grads):
        assert g.abs().sum() > 0, name
    with pytest.raises(ValueError, match="landmark_norm=True .* needs sampling='conv'"):
        build_attention("soft", 16, 2, max_len=32, landmark_norm=True)


@pytest.mark.parametrize("bad, message", [
    (dict(sampling="max"), "choose from"), (dict(inverse="svd"), "choose from"), (dict(window=0), "window"),
    (dict(num_landmarks=0), "num_landmarks"), (dict(newton_init="x"), "choose from"), (dict(iters=-1), "iters"),
])
def test_bad_options_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        soft_attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), **bad)
    with pytest.raises(ValueError, match=message):
        soft_attention_reference(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), **bad)
    with pytest.raises(ValueError, match=message):
        build_attention("soft", 8, 2, max_len=8, **bad)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="square"):
        newton_inverse(torch.randn(3, 4))
    with pytest.raises(ValueError, match="mask"):
        soft_attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.ones(1, 7, dtype=torch.bool))
