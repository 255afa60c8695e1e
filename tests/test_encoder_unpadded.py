"""The encoder hands an unpadded batch to its attentions without a mask (None = every token real); for every
registered attention that gives the logits and gradients of passing the all-True mask through, in float64, and a
padded batch still gets its mask."""
from dataclasses import replace

import pytest
import torch

from lra_soft.attention import ATTENTION
from lra_soft.config import EncoderConfig
from lra_soft.encoder import build_model, pool

CFG = EncoderConfig(vocab_size=20, num_classes=5, max_len=32, dim=16, heads=2, mlp_dim=24, dropout=0.0)
OPTIONS = {"soft": {"num_landmarks": 4}, "nystrom": {"num_landmarks": 4}, "reformer": {"bucket_size": 4}}


def _with_the_mask(model, ids, mask):
    """The encoder's forward with `mask` passed to every block, whatever it holds: the computation before the
    unpadded shortcut."""
    enc = model.encoder
    x = enc.tokens(ids)
    if enc.cls is not None:
        x = torch.cat([enc.cls.expand(ids.shape[0], 1, -1), x], 1)
        mask = torch.cat([mask.new_ones(ids.shape[0], 1), mask], 1)
    x = x + enc.positions(torch.arange(x.shape[1]))
    for block in enc.blocks:
        x = block(x, mask)
    return model.head(pool(enc.norm(x) * mask[..., None].to(x.dtype), mask, enc.cfg.pooling))


def _logits_and_grads(model, forward, ids, mask):
    torch.manual_seed(1)  # the same random draws (Reformer's rotations, random landmarks) for both computations
    out = forward(ids, mask)
    return out, torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_unpadded_batches_equal_passing_the_mask(attention, pooling):
    cfg = replace(CFG, attention=attention, attention_options=OPTIONS.get(attention, {}), pooling=pooling)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    ids = torch.randint(1, cfg.vocab_size, (3, 16))
    for mask in (torch.ones(3, 16, dtype=torch.bool), torch.arange(16) < torch.tensor([[16], [11], [5]])):
        out, grads = _logits_and_grads(model, model, ids, mask)
        ref, ref_grads = _logits_and_grads(model, lambda i, m: _with_the_mask(model, i, m), ids, mask)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            assert (g is None) == (r is None), name
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)


def test_the_attentions_get_no_mask_only_when_nothing_is_padded(monkeypatch):
    model = build_model(replace(CFG, attention="softmax"))
    seen = []
    for block in model.encoder.blocks:
        original = block.attn.forward
        monkeypatch.setattr(block.attn, "forward", lambda x, mask=None, f=original: seen.append(mask) or f(x, mask))
    ids = torch.randint(1, CFG.vocab_size, (2, 8))
    model(ids, torch.ones(2, 8, dtype=torch.bool))
    assert seen == [None, None]
    seen.clear()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    model(ids, mask)
    assert [m is mask for m in seen] == [True, True]
