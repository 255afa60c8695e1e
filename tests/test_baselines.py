"""Every baseline approximation against its exact reference, outputs and gradients.

- softmax: SDPA against the manual path, with padding masks.
- linformer: k = n with identity projections is softmax attention.
- performer: the FAVOR+ error falls as the number of features grows and is small at many features.
- nystrom: landmarks = tokens (m = n, exact pseudo-inverse) is softmax attention, also with padding, where segments
  are left empty; the iterative pseudo-inverse converges to torch.linalg.pinv.
- reformer: one chunk covering the whole sequence is shared-QK softmax attention without attention to self (except
  when nothing else is available); with many buckets and chunks it matches a per-query loop over the sorted order.
"""
import pytest
import torch
from torch.testing import assert_close

from lra_soft.attention import build_attention
from lra_soft.attention.linformer import LinformerAttention
from lra_soft.attention.nystrom import iterative_pinv, nystrom_attention, segment_ids, segment_means
from lra_soft.attention.performer import favor_attention, orthogonal_features
from lra_soft.attention.reformer import lsh_attention, lsh_buckets
from lra_soft.attention.softmax import SoftmaxAttention, softmax_attention_reference


def _lengths_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (b, n)


def _grads(fn, *inputs):
    """Output of fn and the gradients of a fixed random projection of it with respect to every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad((out * weight).sum(), inputs)


# ---------------------------------------------------------------- softmax


def test_sdpa_matches_manual_softmax_with_masks():
    x = torch.randn(3, 17, 32)
    mask = _lengths_mask([17, 9, 1], 17)
    fused = SoftmaxAttention(32, 2, max_len=17)
    manual = SoftmaxAttention(32, 2, max_len=17, fused=False)
    manual.load_state_dict(fused.state_dict())
    valid = mask[..., None]
    out_f, g_f = _grads(lambda t: fused(t, mask) * valid, x)
    out_m, g_m = _grads(lambda t: manual(t, mask) * valid, x)
    assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    assert_close(g_f[0], g_m[0], atol=1e-5, rtol=1e-5)
    for attn in (fused, manual):
        (attn(x, mask) * valid).square().sum().backward()
    for (name, p_f), p_m in zip(fused.named_parameters(), manual.parameters()):
        assert_close(p_f.grad, p_m.grad, atol=1e-5, rtol=1e-5, msg=f"parameter {name}")


# ---------------------------------------------------------------- linformer


def test_linformer_identity_projection_is_softmax():
    n, dim, heads = 24, 32, 2
    lin = LinformerAttention(dim, heads, max_len=n, k=n).double()
    ref = SoftmaxAttention(dim, heads, max_len=n, fused=False).double()
    with torch.no_grad():
        lin.E.copy_(torch.eye(n).expand(heads, n, n))
        lin.F.copy_(torch.eye(n).expand(heads, n, n))
    ref.load_state_dict({k: v for k, v in lin.state_dict().items() if k not in ("E", "F")})
    x = torch.randn(2, n, dim, dtype=torch.float64)
    out_l, g_l = _grads(lin, x)
    out_r, g_r = _grads(ref, x)
    assert_close(out_l, out_r)
    assert_close(g_l[0], g_r[0])


def test_linformer_short_sequence_uses_first_columns_and_long_sequence_fails():
    lin = LinformerAttention(16, 2, max_len=32, k=8)
    x = torch.randn(1, 10, 16)
    with torch.no_grad():
        lin.E[:, :, 10:] = float("nan")  # columns past n must never be read
        lin.F[:, :, 10:] = float("nan")
    assert torch.isfinite(lin(x)).all()
    with pytest.raises(ValueError, match="max_len"):
        lin(torch.randn(1, 33, 16))


# ---------------------------------------------------------------- performer


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_features(40, 16)  # blocks of 16, 16, 8 rows
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram), atol=1e-4, rtol=0)


def test_performer_converges_to_softmax_as_features_grow():
    b, h, n, d = 2, 2, 32, 8
    q, k, v = (0.5 * torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = _lengths_mask([32, 20], n)
    out_ref, g_ref = _grads(lambda q, k, v: softmax_attention_reference(q, k, v, mask), q, k, v)
    errors, grad_errors = {}, {}
    for m in (16, 256, 4096, 32768):
        w = orthogonal_features(m, d, dtype=torch.float64)
        out, g = _grads(lambda q, k, v, w=w: favor_attention(q, k, v, w, mask), q, k, v)
        errors[m] = ((out - out_ref).norm() / out_ref.norm()).item()
        grad_errors[m] = max(((got - want).norm() / want.norm()).item() for got, want in zip(g, g_ref))
    print("performer relative error by number of features: output", errors, "gradients", grad_errors)
    # the estimator's error falls like 1/sqrt(m); gradients are noisier than outputs
    assert errors[16] > errors[256] > errors[4096] > errors[32768]
    assert errors[32768] < 0.03
    assert grad_errors[256] > grad_errors[4096] > grad_errors[32768]
    assert grad_errors[32768] < 0.15


def test_performer_padding_is_excluded_and_stabiliser_is_exact():
    b, h, n, d = 1, 1, 12, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    w = orthogonal_features(64, d, dtype=torch.float64)
    mask = _lengths_mask([7], n)
    out = favor_attention(q, k, v, w, mask)[:, :, :7]
    assert_close(favor_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], w), out)
    # long valid keys have exponents near -200; a stabiliser that also saw the (zero) padded keys, exponent 0, would
    # underflow every valid key feature in float32
    k_long = 30 * k.float() / k.float().norm(dim=-1, keepdim=True)
    k_long[:, :, 7:] = 0.0
    out_long = favor_attention(q.float(), k_long, v.float(), w.float(), mask)[:, :, :7]
    assert out_long.abs().max() > 0.1
    assert_close(out_long, favor_attention(q.float()[:, :, :7], k_long[:, :, :7], v.float()[:, :, :7], w.float()))
    # a plain, unstabilised FAVOR+ on the same features
    scale = d ** -0.25

    def phi(x):
        return torch.exp(x * scale @ w.T - (x * scale).pow(2).sum(-1, keepdim=True) / 2)

    pq, pk = phi(q[:, :, :7]), phi(k[:, :, :7])
    plain = (pq @ (pk.transpose(-1, -2) @ v[:, :, :7])) / (pq @ pk.sum(-2, keepdim=True).transpose(-1, -2))
    assert_close(out, plain)


def test_performer_redraw_policy_and_state_dict():
    attn = build_attention("performer", 16, 2, max_len=8, num_features=8, redraw_every=3)
    x = torch.randn(1, 8, 16)
    first = attn.features.clone()
    attn(x), attn(x), attn(x)
    assert torch.equal(attn.features, first)                 # passes 1-3 use the initial draw
    attn(x)
    assert not torch.equal(attn.features, first)             # pass 4 redraws
    attn.eval()
    drawn = attn.features.clone()
    y1, y2 = attn(x), attn(x)
    assert torch.equal(attn.features, drawn) and torch.equal(y1, y2)
    clone = build_attention("performer", 16, 2, max_len=8, num_features=8, redraw_every=3).eval()
    clone.load_state_dict(attn.state_dict())
    assert int(clone.calls) == 4
    assert torch.equal(clone(x), y1)
    # a redraw depends only on the saved seed and pass count: a resumed module redraws what an uninterrupted one does
    resumed = build_attention("performer", 16, 2, max_len=8, num_features=8, redraw_every=3)
    uninterrupted = build_attention("performer", 16, 2, max_len=8, num_features=8, redraw_every=3)
    uninterrupted(x), uninterrupted(x)
    resumed.load_state_dict(uninterrupted.state_dict())
    for _ in range(5):
        uninterrupted(x), resumed(x)
    assert torch.equal(resumed.features, uninterrupted.features)
    never = build_attention("performer", 16, 2, max_len=8, num_features=8, redraw_every=0)
    before = never.features.clone()
    for _ in range(5):
        never(x)
    assert torch.equal(never.features, before)


# ---------------------------------------------------------------- nystrom


def test_segment_means_match_a_loop_over_valid_tokens():
    b, h, n, d, m = 3, 2, 23, 4, 5
    x = torch.randn(b, h, n, d)
    mask = torch.rand(b, n) > 0.3
    mask[2] = False
    mask[2, 4] = True  # one valid token: one non-empty segment
    seg, landmark_mask = segment_ids(mask, b, n, m, x.device)
    means = segment_means(x, seg, m)
    for i in range(b):
        idx = mask[i].nonzero().squeeze(1)
        L = len(idx)
        for s in range(m):
            members = idx[[r for r in range(L) if r * m // L == s]]
            assert bool(landmark_mask[i, s]) == (len(members) > 0)
            want = x[i][:, members].mean(dim=1) if len(members) else torch.zeros(h, d)
            assert_close(means[i, :, s], want)


@pytest.mark.parametrize("lengths", [[16, 16], [16, 9]], ids=["full", "padded"])
def test_nystrom_with_every_token_a_landmark_is_softmax(lengths):
    b, h, n, d = 2, 2, 16, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = _lengths_mask(lengths, n)
    valid = mask[:, None, :, None]  # outputs at padded positions are not defined alike
    out_n, g_n = _grads(lambda q, k, v: nystrom_attention(q, k, v, mask, num_landmarks=n, inverse="pinv") * valid,
                        q, k, v)
    out_r, g_r = _grads(lambda q, k, v: softmax_attention_reference(q, k, v, mask) * valid, q, k, v)
    assert_close(out_n, out_r)
    for got, want in zip(g_n, g_r):
        assert_close(got, want)


def test_nystrom_matches_the_papers_formulas_where_they_apply():
    """n a multiple of m, no padding, one matrix: segment means by reshape, Z_0 = A^T / (max colsum * max rowsum)."""
    n, d, m = 48, 8, 6
    q, k, v = (torch.randn(1, 1, n, d, dtype=torch.float64) for _ in range(3))

    def reference(q, k, v):
        q, k = q * d ** -0.25, k * d ** -0.25
        q_l, k_l = q.reshape(1, 1, m, n // m, d).mean(-2), k.reshape(1, 1, m, n // m, d).mean(-2)
        kernel_1 = (q @ k_l.transpose(-1, -2)).softmax(-1)
        A = (q_l @ k_l.transpose(-1, -2)).softmax(-1)
        kernel_3 = (q_l @ k.transpose(-1, -2)).softmax(-1)
        Z = A.transpose(-1, -2) / (A.sum(-2).max() * A.sum(-1).max())
        for _ in range(6):
            AZ = A @ Z
            Z = 0.25 * Z @ (13 * torch.eye(m) - AZ @ (15 * torch.eye(m) - AZ @ (7 * torch.eye(m) - AZ)))
        return kernel_1 @ Z @ kernel_3 @ v

    out, g = _grads(lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=m), q, k, v)
    out_ref, g_ref = _grads(reference, q, k, v)
    assert_close(out, out_ref)
    for got, want in zip(g, g_ref):
        assert_close(got, want)


def test_nystrom_empty_landmarks_drop_out_exactly():
    """Valid length L < m leaves m - L segments empty: the result (6 iterations) is that of m = L without padding."""
    b, h, n, d, L = 2, 2, 12, 8, 5
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = _lengths_mask([L, L], n)
    out = nystrom_attention(q, k, v, mask, num_landmarks=8)[:, :, :L]
    alone = nystrom_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], num_landmarks=L)
    assert_close(out, alone)


def test_nystrom_iterative_inverse_converges_with_iterations():
    b, h, n, d, m = 2, 2, 64, 16, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    out_exact = nystrom_attention(q, k, v, num_landmarks=m, inverse="pinv")
    errors = [((nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=it) - out_exact).norm()
               / out_exact.norm()).item() for it in (2, 6, 30)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_iterative_pinv_converges_to_torch_pinv():
    x = torch.randn(4, 96, 16, dtype=torch.float64) * 16 ** -0.25
    seg, _ = segment_ids(None, 4, 96, 32, x.device)
    landmarks = segment_means(x[:, None], seg, 32)[:, 0]               # (4, 32, 16)
    A = (landmarks @ landmarks.transpose(-1, -2)).softmax(dim=-1)        # a Nystromformer kernel_2
    exact = torch.linalg.pinv(A)
    errors = [((iterative_pinv(A, it) - exact).norm() / exact.norm()).item() for it in (1, 4, 8, 40)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8
    assert_close(iterative_pinv(A, 40), exact)
    # per-matrix initialisation: a matrix's inverse does not depend on the rest of the batch
    assert_close(iterative_pinv(A[:1] * 100, 6)[0] * 100, iterative_pinv(A, 6)[0])


def test_nystrom_convolution_and_its_switch():
    x = torch.randn(2, 20, 16)
    mask = _lengths_mask([20, 11], 20)
    with_conv = build_attention("nystrom", 16, 2, max_len=20, num_landmarks=4, conv_kernel=5)
    without = build_attention("nystrom", 16, 2, max_len=20, num_landmarks=4, conv_kernel=0)
    without.load_state_dict({k: v for k, v in with_conv.state_dict().items() if not k.startswith("conv")})
    with torch.no_grad():
        with_conv.conv.weight.zero_()
    assert_close(with_conv(x, mask), without(x, mask))
    with pytest.raises(ValueError, match="odd"):
        build_attention("nystrom", 16, 2, max_len=20, conv_kernel=4)


# ---------------------------------------------------------------- reformer


def _shared_qk_reference(qk, v, mask):
    """softmax_j(q_i . q_j / ||q_j||) over valid j != i; v_i itself when i has no other valid key."""
    n = qk.shape[2]
    logits = qk @ (qk / qk.norm(dim=-1, keepdim=True)).transpose(-1, -2)   # (b, h, n, n)
    allowed = mask[:, None, None, :] & ~torch.eye(n, dtype=torch.bool)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    alone = ~allowed.any(dim=-1, keepdim=True)                              # (b, 1|h, n, 1)
    return torch.where(alone, v, probs @ v)


@pytest.mark.parametrize("n_buckets", [1, 8])
def test_reformer_single_chunk_is_shared_qk_softmax_without_self(n_buckets):
    b, h, n, d = 3, 2, 20, 8
    qk, v = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, n, d, dtype=torch.float64)
    mask = _lengths_mask([20, 13, 1], n)
    rotations = torch.randn(d, 2, max(1, n_buckets // 2), dtype=torch.float64)

    def lsh(qk, v):
        buckets = lsh_buckets(qk.detach(), rotations) if n_buckets > 1 else torch.zeros(b, h, 2, n, dtype=torch.long)
        return lsh_attention(qk, v, buckets, mask, n_buckets=n_buckets, bucket_size=32)

    valid = mask[:, None, :, None]
    out, g = _grads(lambda qk, v: lsh(qk, v) * valid, qk, v)
    out_ref, g_ref = _grads(lambda qk, v: _shared_qk_reference(qk, v, mask) * valid, qk, v)
    assert_close(out, out_ref)
    for got, want in zip(g, g_ref):
        assert_close(got, want)


def _lsh_loop_reference(qk, v, buckets, valid, c):
    """Per query, per round: the window = its chunk and the previous one in the (bucket, position) order of the valid
    tokens; softmax without self unless alone; rounds combined by their log-sum-exp."""
    h, n, d = qk.shape
    out = torch.zeros(h, n, d, dtype=qk.dtype)
    for head in range(h):
        for i in torch.nonzero(valid).squeeze(1).tolist():
            outs, lses = [], []
            for r in range(buckets.shape[1]):
                order = sorted(torch.nonzero(valid).squeeze(1).tolist(), key=lambda j: (buckets[head, r, j], j))
                slot = order.index(i)
                chunk = slot // c
                window = order[max(0, (chunk - 1) * c):(chunk + 1) * c]
                others = [j for j in window if j != i]
                if not others:
                    outs.append(v[head, i])
                    lses.append(torch.tensor(-1e5, dtype=qk.dtype))
                    continue
                keys = qk[head, others] / qk[head, others].norm(dim=-1, keepdim=True)
                logits = keys @ qk[head, i]
                outs.append(logits.softmax(0) @ v[head, others])
                lses.append(logits.logsumexp(0))
            weights = torch.stack(lses).softmax(0)
            out[head, i] = (weights[:, None] * torch.stack(outs)).sum(0)
    return out


def test_reformer_chunks_and_rounds_match_a_loop_reference():
    h, n, d, c, n_buckets = 2, 22, 8, 4, 4
    qk, v = torch.randn(1, h, n, d, dtype=torch.float64), torch.randn(1, h, n, d, dtype=torch.float64)
    mask = _lengths_mask([17], n)
    buckets = lsh_buckets(qk, torch.randn(d, 3, n_buckets // 2, dtype=torch.float64))  # (1, h, 3, n)
    out = lsh_attention(qk, v, buckets, mask, n_buckets=n_buckets, bucket_size=c)
    ref = _lsh_loop_reference(qk[0], v[0], buckets[0], mask[0], c)
    assert_close(out[0][:, :17], ref[:, :17])


def test_lsh_buckets_are_angular():
    x = torch.randn(1, 1, 50, 8)
    rotations = torch.randn(8, 2, 4)
    buckets = lsh_buckets(x, rotations)
    assert buckets.min() >= 0 and buckets.max() < 8
    assert torch.equal(lsh_buckets(3.0 * x, rotations), buckets)                  # scale-invariant
    assert torch.equal(lsh_buckets(-x, rotations), (buckets + 4) % 8)             # x and -x are opposite


def test_reformer_rotations_fixed_in_eval_and_fresh_in_training():
    attn = build_attention("reformer", 16, 2, max_len=64, bucket_size=4)
    x = torch.randn(1, 32, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))
