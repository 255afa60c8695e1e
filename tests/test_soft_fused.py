"""The fused CPU product of SOFT (`soft_fused`) against the plain-autograd reference (`soft_reference`): outputs and
gradients in float64 with padding masks and empty landmarks, then what the fusion itself must not change: the token
blocking, the head-split memory layout, the inference product form, NaN in padding, torch.compile, what is kept for
backward. The spectral form of Newton (m >= 256 on CPU) has its own file, tests/test_soft_newton.py; the cases marked
"spectral" here run it at small m."""
import pytest
import torch

from lra_soft.attention import soft_fused
from lra_soft.attention.soft import soft_attention
from lra_soft.attention.soft_fused import soft_product
from lra_soft.attention.soft_reference import SoftOptions, soft_attention_reference, soft_product_reference


def product_inputs(masked: bool, n: int = 37, d: int = 8, m: int = 10):
    """Scaled landmarks (b, h, m, d) with empty ones zeroed (the second sequence has three), unscaled q, v (b, h, n, d)
    and the masks, as `soft_attention_with` hands them to a product."""
    torch.manual_seed(42)
    q = torch.randn(2, 2, n, d, dtype=torch.float64)
    v = torch.randn(2, 2, n, d, dtype=torch.float64)
    mask = (torch.arange(n) < torch.tensor([[n], [21]])) if masked else None
    landmark_mask = torch.arange(m) < torch.tensor([[m], [m - 3]])
    landmarks = (0.3 * torch.randn(2, 2, m, d, dtype=torch.float64)).masked_fill(~landmark_mask[:, None, :, None], 0)
    return landmarks, q, v, mask, landmark_mask, d ** -0.25


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("options", [SoftOptions(iters=60), SoftOptions(inverse="solve", ridge=1e-6)],
                         ids=["newton", "solve"])
def test_fused_product_equals_reference(options, masked):
    """The same arguments give the same outputs and the same gradients for landmarks, q and v (the fused backward is
    hand-written; the reference's is autograd through every Newton iteration or through torch's Cholesky solve)."""
    landmarks, q, v, mask, landmark_mask, scale = product_inputs(masked)
    g = torch.randn_like(q)
    results = []
    for product in (soft_product, soft_product_reference):
        inputs = [t.clone().requires_grad_() for t in (landmarks, q, v)]
        out = product(*inputs[:3], mask, landmark_mask, scale, options)
        results.append((out, *torch.autograd.grad((out * g).sum(), inputs)))
    for name, fused, reference in zip(["out", "d_landmarks", "dq", "dv"], *results):
        torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-11, msg=name)
    if mask is not None:
        assert results[0][0][~mask[:, None].expand(-1, 2, -1)].abs().max() == 0  # padded rows are exactly zero


@pytest.mark.parametrize("options", [SoftOptions(iters=60), SoftOptions(inverse="solve")], ids=["newton", "solve"])
def test_fused_product_without_gradients_equals_reference(options):
    """No input needs a gradient: Newton runs in product form (`_newton_apply`), and must still match."""
    landmarks, q, v, mask, landmark_mask, scale = product_inputs(masked=True)
    with torch.no_grad():
        fused = soft_product(landmarks, q, v, mask, landmark_mask, scale, options)
        reference = soft_product_reference(landmarks, q, v, mask, landmark_mask, scale, options)
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("options", [SoftOptions(inverse="pinv"), SoftOptions(newton_grad="unrolled")])
def test_fused_product_refuses_what_it_does_not_compute(options):
    landmarks, q, v, mask, landmark_mask, scale = product_inputs(masked=True)
    with pytest.raises(ValueError, match="fused product"):
        soft_product(landmarks, q, v, mask, landmark_mask, scale, options)


@pytest.mark.parametrize("options", [dict(), dict(num_landmarks=6), dict(sampling="first"), dict(inverse="solve")])
def test_soft_attention_equals_its_reference(options):
    """The dispatcher's fused path against `soft_attention_reference` end to end (landmark sampling included)."""
    q = torch.randn(2, 2, 41, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 41, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(41) < torch.tensor([[41], [26]])
    g = torch.randn(2, 2, 41, 8, dtype=torch.float64)
    results = []
    for fn in (soft_attention, soft_attention_reference):
        out = fn(q, v, mask, iters=60, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference, rtol=1e-8, atol=1e-10)


@pytest.mark.slow  # torch.compile
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


PATHS = [(dict(), False), (dict(), True), (dict(inverse="solve"), False), (dict(num_landmarks=6), False),
         (dict(num_landmarks=6), True)]
PATH_IDS = ["newton", "newton-spectral", "solve", "num_landmarks", "num_landmarks-spectral"]


@pytest.mark.parametrize("options, spectral", PATHS, ids=PATH_IDS)
def test_blocked_kernel_equals_one_block(options, spectral, monkeypatch):
    """The CPU blocking over tokens (cache-sized blocks of P, halves of them in backward) changes nothing: outputs
    and gradients."""
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 1 if spectral else 10**9)
    q = torch.randn(2, 2, 50, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 50, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(50) < torch.tensor([[50], [31]])
    g = torch.randn(2, 2, 50, 8, dtype=torch.float64)
    results = []
    for elements, minimum in [(1 << 20, 256), (64, 7)]:  # one block; blocks of 7 tokens (the last one shorter)
        monkeypatch.setattr(soft_fused, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(soft_fused, "MIN_CHUNK", minimum)
        assert len(soft_fused._chunks(50, 2 * 2 * 13, q.device)) == (1 if elements > 64 else 8)
        out = soft_attention(q, v, mask, iters=30, **options)
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, v))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options, spectral", PATHS, ids=PATH_IDS)
def test_head_split_layout_is_kept_and_changes_nothing(options, spectral, monkeypatch):
    """q, v as head-split views of (b, n, h, d) memory give the same outputs and gradients as contiguous copies, and
    the output and gradients keep that memory layout (so merging the heads back costs no copy)."""
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 1 if spectral else 10**9)
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


@pytest.mark.parametrize("options, spectral", PATHS + [(dict(sampling="first"), False)],
                         ids=PATH_IDS + ["first"])
def test_nan_in_padding_does_not_leak(options, spectral, monkeypatch):
    """Whatever padded rows hold (here NaN and inf) changes nothing at valid positions, in outputs or gradients."""
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 1 if spectral else 10**9)
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


@pytest.mark.parametrize("options, spectral", [(dict(), False), (dict(), True), (dict(inverse="solve"), False)],
                         ids=["newton", "newton-spectral", "solve"])
def test_only_p_is_kept_besides_q_and_v(options, spectral, monkeypatch):
    """What the product saves for backward: q and v themselves (the caller's tensors, not copies), the blocks of P
    (m x n in all) and m x m / m x d matrices, nothing else of the tokens' size."""
    monkeypatch.setattr(soft_fused, "SPECTRAL_MIN_LANDMARKS", 1 if spectral else 10**9)
    monkeypatch.setattr(soft_fused, "CHUNK_ELEMENTS", 1 << 10)  # several blocks
    b, h, n, d, m = 2, 2, 300, 8, 16
    landmarks = torch.randn(b, h, m, d, requires_grad=True)
    q, v = torch.randn(b, h, n, d, requires_grad=True), torch.randn(b, h, n, d, requires_grad=True)
    mask = torch.arange(n) < torch.tensor([[n], [200]])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        soft_product(landmarks, q, v, mask, torch.ones(b, m, dtype=torch.bool), d ** -0.25, SoftOptions(**options))
    aliases = [t for t in saved if t.untyped_storage().data_ptr() in (q.untyped_storage().data_ptr(),
                                                                        v.untyped_storage().data_ptr())]
    assert len(aliases) == 2
    others = sum(t.numel() for t in saved if not any(t is a for a in aliases))
    assert others <= b * h * m * n + b * n + 4 * b * h * m * (m + 2 * d)  # P, mask, A, Y, V / Z / L, p, landmarks
