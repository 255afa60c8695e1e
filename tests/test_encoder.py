"""The 2-layer LRA encoder: pooling modes against direct formulas, padding invariance, the shared pair encoder."""
from dataclasses import replace

import pytest
import torch

from lra_soft.config import EncoderConfig
from lra_soft.encoder import build_model, pool
from lra_soft.train import lr_factor

CFG = EncoderConfig(vocab_size=20, num_classes=5, max_len=32, attention="softmax", dim=16, heads=2, mlp_dim=24)


def _ids(b=3, n=12, pad=(0, 4, 7)):
    ids = torch.randint(1, CFG.vocab_size, (b, n))
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, p in enumerate(pad):
        if p:
            ids[row, -p:], mask[row, -p:] = 0, False
    return ids, mask


def test_pool_formulas():
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = x * mask[..., None]
    torch.testing.assert_close(pool(x, mask, "mean")[0], x[0, :3].mean(0))
    torch.testing.assert_close(pool(x, mask, "mean_padded")[0], x[0].sum(0) / 5)  # the harness: sum / padded length
    torch.testing.assert_close(pool(x, mask, "cls"), x[:, 0])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(x, mask, "max")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_extra_padding_does_not_change_logits(pooling):
    """Mean over real tokens and CLS ignore padding entirely; mean_padded (harness) does not, by design."""
    model = build_model(replace(CFG, pooling=pooling)).eval()
    ids, mask = _ids()
    more_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
    more_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(more_ids, more_mask), model(ids, mask), atol=1e-5, rtol=1e-5)
    padded = build_model(replace(CFG, pooling="mean_padded")).eval()
    assert not torch.allclose(padded(more_ids, more_mask), padded(ids, mask), atol=1e-4)


def test_pair_head_is_shared_encoder_on_interactions():
    model = build_model(replace(CFG, pair=True, num_classes=2)).eval()
    (a, ma), (b, mb) = _ids(), _ids()
    x1, x2 = model.encoder(a, ma), model.encoder(b, mb)
    expected = model.head(torch.cat([x1, x2, x1 * x2, x1 - x2], -1))
    torch.testing.assert_close(model(a, ma, b, mb), expected)
    assert model.head[0].in_features == 4 * CFG.dim
    with pytest.raises(ValueError, match="input_ids2"):
        model(a, ma)


def test_structure_and_gradients():
    model = build_model(CFG)
    ids, mask = _ids()
    out = model(ids, mask)
    assert out.shape == (3, CFG.num_classes)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert len(model.encoder.blocks) == 2 and model.encoder.positions.num_embeddings == CFG.max_len
    assert model.encoder.tokens.weight.std().item() == pytest.approx(0.02, rel=0.3)  # harness init N(0, 0.02)


def test_bad_inputs_fail_clearly():
    model = build_model(CFG)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), 25), torch.ones(1, 4, dtype=torch.bool))


def test_one_cycle_schedule_matches_pytorch_onecycle():
    steps, warmup = 100, 10
    f = [lr_factor(s, steps, warmup) for s in range(steps)]
    sched = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                max_lr=1.0, total_steps=steps, pct_start=warmup / steps,
                                                anneal_strategy="linear", cycle_momentum=False)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    torch.testing.assert_close(torch.tensor(f), torch.tensor(lrs), atol=1e-7, rtol=1e-6)
    assert f[0] == pytest.approx(1 / 25) and max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(1 / 25e4)
    assert lr_factor(0, 3, 1000) == pytest.approx(1 / 25) and lr_factor(2, 3, 1000) == pytest.approx(1.0)
