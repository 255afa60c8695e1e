"""The CPU dropout of lra_soft.dropout: drop rate at the quantized p, exact mean, mask * scale gradient, torch's
nn.Dropout contract (validation, eval identity, repr, empty state_dict), seeding, bf16 and the modules that use it."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lra_soft.config import EncoderConfig
from lra_soft.dropout import LEVELS, Dropout, dropout, quantize, uniform15
from lra_soft.encoder import build_model


def _z(count: int, n: int, q: float) -> float:
    """Standard score of ``count`` successes in ``n`` Bernoulli(q) trials."""
    return (count - n * q) / math.sqrt(n * q * (1 - q))


def test_quantize():
    assert quantize(0.1) == (3277, LEVELS / (LEVELS - 3277))
    assert 3277 / LEVELS == pytest.approx(0.100006, abs=1e-6)
    assert quantize(0.5) == (LEVELS // 2, 2.0)


def test_uniform15_fields_are_uniform():
    r = uniform15(torch.Size([1_000_000]), torch.device("cpu"))
    assert r.dtype == torch.int16 and int(r.min()) == 0 and int(r.max()) == LEVELS - 1
    fields = r.view(-1, 4)  # the four 16-bit fields of one int64 draw
    for bit in range(15):
        ones = ((fields >> bit) & 1).sum(0)
        assert all(abs(_z(int(c), fields.shape[0], 0.5)) < 5 for c in ones), (bit, ones)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_mean(p):
    t, scale = quantize(p)
    q = t / LEVELS
    x = torch.ones(1_000_000, dtype=torch.float64)
    y = dropout(x, p, True)
    dropped = int((y == 0).sum())
    assert abs(_z(dropped, x.numel(), q)) < 5  # 5 sigma of a binomial at the quantized p: ~1e-3 relative at p=0.1
    assert set(y.unique().tolist()) == {0.0, scale}
    # The mean is preserved: E[y] = (1 - q) * scale = 1 exactly; the sample mean within 5 standard errors.
    assert (1 - q) * scale == pytest.approx(1.0, rel=1e-15)
    assert abs(y.mean().item() - 1) < 5 * scale * math.sqrt(q * (1 - q) / x.numel())


def test_gradient_is_mask_times_scale():
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3, True)
    keep = y != 0
    _, scale = quantize(0.3)
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(gx, grad * keep * scale, rtol=0, atol=0)


def test_gradcheck_with_a_fixed_mask():
    def reseeded(z):  # every call draws the same mask, so finite differences see one linear map
        torch.manual_seed(1)
        return dropout(z, 0.3, True)

    assert torch.autograd.gradcheck(reseeded, (torch.randn(6, 7, dtype=torch.float64, requires_grad=True),))


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(8, 16)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x
    m = Dropout(0.5).eval()
    assert m(x) is x


def test_p_one_and_extremes_follow_torch():
    x = torch.randn(8, 16, requires_grad=True)
    y = dropout(x, 1.0, True)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # p below 2^-16 quantizes to 0: torch's own dropout, not a silent identity.
    torch.manual_seed(3)
    ours = dropout(x, 1e-6, True)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, F.dropout(x, 1e-6, True))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_p_validation(p):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        Dropout(p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        dropout(torch.ones(3), p, True)


def test_same_seed_same_mask_and_rng_state_resumes():
    x = torch.randn(32, 64)
    torch.manual_seed(7)
    a = dropout(x, 0.1, True)
    state = torch.get_rng_state()
    b = dropout(x, 0.1, True)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.1, True), a)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1, True), b)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    z = torch.randn(16, 128)
    # |x| >= 0.5: no exact zeros in any dtype (torch 2.11's bf16 randn gives some), so y is zero exactly where dropped
    x = torch.where(z < 0, z - 0.5, z + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.2, True)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad != 0, y != 0)


def test_bf16_autocast():
    lin, drop = nn.Linear(32, 32), Dropout(0.25)
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = drop(lin(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_inplace():
    x = torch.randn(16, 32, requires_grad=True)
    h = x * 1.0
    y = dropout(h, 0.5, True, inplace=True)
    assert y is h
    y.sum().backward()
    _, scale = quantize(0.5)
    torch.testing.assert_close(x.grad, (y != 0).float() * scale, rtol=0, atol=0)


def test_module_contract_matches_nn_dropout():
    ours, torchs = Dropout(0.1, inplace=True), nn.Dropout(0.1, inplace=True)
    assert repr(ours) == repr(torchs) == "Dropout(p=0.1, inplace=True)"
    assert isinstance(ours, nn.Dropout)
    assert not list(ours.parameters()) and not list(ours.buffers()) and ours.state_dict() == {}
    assert repr(Dropout()) == "Dropout(p=0.5, inplace=False)"


def test_encoder_state_dict_loads_into_torch_dropout_model():
    cfg = EncoderConfig(vocab_size=20, num_classes=5, max_len=16, attention="softmax", dim=16, heads=2, mlp_dim=24)
    model = build_model(cfg)
    assert any(isinstance(m, Dropout) for m in model.modules())
    reference = build_model(cfg)
    for m in list(reference.modules()):  # the same model with torch's dropout everywhere
        for name, child in list(m.named_children()):
            if isinstance(child, Dropout):
                setattr(m, name, nn.Dropout(child.p))
    assert not any(type(m) is Dropout for m in reference.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()
    loaded = reference.load_state_dict(model.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys
    ids, mask = torch.randint(0, 20, (3, 16)), torch.arange(16) < torch.tensor([[16], [9], [4]])
    # the two models were initialised differently, so equal outputs mean the weights really were loaded
    assert torch.equal(model.eval()(ids, mask), reference.eval()(ids, mask))


def test_compile_traces_without_graph_break():
    m = nn.Sequential(nn.Linear(8, 8), Dropout(0.1))
    explained = torch._dynamo.explain(m)(torch.randn(4, 8))
    assert explained.graph_break_count == 0, explained.break_reasons
