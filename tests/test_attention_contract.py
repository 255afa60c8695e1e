"""The contract every registered attention keeps, parametrized over the registry itself.

Each variant is built through ``build_attention`` with its defaults; the variants whose defaults would put a small
test sequence in a single chunk / landmark / feature block are also built with small options so that the chunked
paths run. Padding invariance: a batch with padding is padded again to twice its length with random tokens and with
new random content in its padded positions; outputs at valid positions must not move by more than ``TOLERANCE``,
in float64 (1e-10 for every variant; measured: 4e-14 at most, SOFT's). In float32 the same change is rounding, and
SOFT's inverse of its landmark kernel matrix amplifies it by the matrix's conditioning, by an amount that depends on
the CPU's kernels (SOFT's 1.6e-5 on one machine, under 1.2e-6 on another): float64 holds the exact contract on every
machine, where a padded token that leaked would still move an output by far more. ``python
scripts/padding_table.py`` prints the float32 errors.
Random draws (Reformer's training-mode rotations) are reseeded before each forward pass so that two passes differ
only by their padding. The README's Attentions table is held to every constructor's options and defaults.
"""
import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lra_soft.attention import ATTENTION, attention_options, build_attention

DIM, HEADS, MAX_LEN = 16, 2, 64
SMALL_OPTIONS = [  # options that exercise chunking / several landmarks at the small lengths used here, and switches
    ("linformer", {"k": 8}),
    ("linformer", {"k": 8, "share_kv": True}),
    ("nystrom", {"num_landmarks": 4, "conv_kernel": 5}),
    ("nystrom", {"num_landmarks": 4, "conv_kernel": 0, "inverse": "pinv"}),
    ("performer", {"num_features": 16}),
    ("soft", {"num_landmarks": 4, "conv_kernel": 5}),
    ("soft", {"sampling": "conv", "window": 4, "landmark_norm": True}),
    ("reformer", {"bucket_size": 4, "n_buckets": 4}),
    ("reformer", {"bucket_size": 4, "n_buckets": 4, "n_hashes": 1}),
]
CASES = [(name, {}) for name in sorted(ATTENTION)] + [(name, o) for name, o in SMALL_OPTIONS if name in ATTENTION]
IDS = [name + "".join(f"-{k}{v}" for k, v in options.items()) for name, options in CASES]
TOLERANCE = {}  # name -> padding-invariance bound (float64) where a variant cannot hold 1e-10; none needs one
LENGTHS = (13, 3)  # 13: not a multiple of any window / segment count; 3: shorter than every window


def _build(name, options, dim=DIM, heads=HEADS, max_len=MAX_LEN):
    return build_attention(name, dim, heads, max_len=max_len, **options)


def _run(attn, x, mask=None, seed=1234):
    torch.manual_seed(seed)
    return attn(x, mask)


def _batch(n, b=3, dim=DIM):
    x = torch.randn(b, n, dim)
    lengths = torch.tensor([n, math.ceil(n / 2), 1][:b])
    return x, torch.arange(n)[None, :] < lengths[:, None]  # (b, n)


def padding_invariance_error(name, options, n, mode="train", dim=DIM, heads=HEADS, relative=False,
                             dtype=torch.float32):
    """Largest change of a valid output when padding is refilled and the batch is padded to twice its length
    (``relative``: divided by the largest valid output), in ``dtype``."""
    attn = _build(name, options, dim, heads, max(MAX_LEN, 2 * n)).train(mode == "train").to(dtype)
    x, mask = _batch(n, dim=dim)
    x = x.to(dtype)
    with torch.no_grad():
        out = _run(attn, x, mask)
        x2 = torch.where(mask[..., None], x, torch.randn_like(x))       # new content in the padded positions
        x2 = torch.cat([x2, torch.randn_like(x2)], dim=1)               # (b, 2n, dim)
        mask2 = torch.cat([mask, torch.zeros_like(mask)], dim=1)
        out2 = _run(attn, x2, mask2)[:, :n]
    error = (out2 - out)[mask].abs().max()
    return (error / out[mask].abs().max() if relative else error).item()


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_shapes_finite_and_every_parameter_gets_a_gradient(name, options):
    attn = _build(name, options)
    x, mask = _batch(13)
    out = _run(attn, x, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    (out * mask[..., None]).square().sum().backward()
    for pname, p in attn.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero or non-finite grad for {pname}"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_padding_invariance(name, options, n, mode):
    error = padding_invariance_error(name, options, n, mode, dtype=torch.float64)
    assert error <= TOLERANCE.get(name, 1e-10), f"{name}: padding moved a valid output by {error:.2e} (float64)"


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_single_valid_token_equals_the_sequence_of_that_token(name, options):
    attn = _build(name, options)
    x = torch.randn(2, 9, DIM)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 0] = True
    out = _run(attn, x, mask)
    assert torch.isfinite(out).all()
    assert_close(out[:, :1], _run(attn, x[:, :1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_batch_of_one_equals_its_row_of_a_batch(name, options):
    attn = _build(name, options)
    x, mask = _batch(13)
    out = _run(attn, x, mask)
    for i in range(x.shape[0]):
        alone = _run(attn, x[i:i + 1], mask[i:i + 1])
        assert_close(alone[0][mask[i]], out[i][mask[i]], atol=1e-5, rtol=1e-5, msg=f"{name}: row {i}")


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_a_fully_padded_row_stays_finite_and_isolated(name, options):
    attn = _build(name, options)
    x, mask = _batch(13)
    mask[1] = False
    out = _run(attn, x, mask)
    assert torch.isfinite(out).all()
    assert_close(out[0], _run(attn, x[:1], mask[:1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_float64_matches_float32(name, options, n):
    attn = _build(name, options)
    x, mask = _batch(n)
    out32 = _run(attn, x, mask)
    out64 = _run(attn.double(), x.double(), mask)
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all()
    assert_close(out64[mask].float(), out32[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_bf16_autocast(name, options):
    attn = _build(name, options)
    x, mask = _batch(13)
    reference = _run(attn, x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(attn, x, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out.float() * mask[..., None]).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    error = (out.float() - reference)[mask].norm() / reference[mask].norm()
    assert error < 0.05, f"{name}: bf16 autocast relative error {error:.3f}"


@pytest.mark.gpu
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_cuda_matches_cpu_and_runs_under_bf16_autocast(name, options):
    attn = _build(name, options).eval()  # eval: Reformer's rotations come from the buffer, not the device's RNG
    x, mask = _batch(13)
    reference = attn(x, mask)
    attn, x, mask = attn.cuda(), x.cuda(), mask.cuda()
    out = attn(x, mask)
    # cuDNN convolutions may run in TF32 (Nystromformer's convolution of V), hence 1e-3
    assert_close(out.cpu()[mask.cpu()], reference[mask.cpu()], atol=1e-3, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x, mask)
    assert torch.isfinite(out).all()
    (out.float() * mask[..., None]).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_unknown_option_fails_listing_the_choices(name):
    with pytest.raises(ValueError) as info:
        build_attention(name, DIM, HEADS, max_len=MAX_LEN, no_such_option=1)
    message = str(info.value)
    assert "no_such_option" in message and name in message
    for option in attention_options(name):
        assert option in message


def test_unknown_name_fails_listing_the_choices():
    with pytest.raises(ValueError) as info:
        build_attention("no_such_attention", DIM, HEADS, max_len=MAX_LEN)
    assert all(name in str(info.value) for name in ATTENTION)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_readme_table_lists_every_option_with_its_default(name):
    section = Path(__file__).resolve().parents[1].joinpath("README.md").read_text().split("## Attentions", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"README's Attentions table needs one row for {name!r}"
    listed = {key: ast.literal_eval(value) for key, value in re.findall(r"`(\w+)=([^`]+)`", rows[0])}
    expected = attention_options(name)
    assert listed == expected, f"README row of {name!r} lists {listed}, the constructor has {expected}"

