"""The SOFT ImageNet backbones: Table 2 sizes, 224 px forward, gradients, other resolutions, the 2D SOFT layer."""
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lra_soft.attention.gaussian import gaussian_attention
from lra_soft.vision import PAPER, PRESETS, VisionConfig, build_model, preset
from lra_soft.vision.layers import SoftAttention2d, drop_path, resize_pos_embed
from lra_soft.vision.model import config_dict
from lra_soft.vision.profile import profile


@pytest.mark.parametrize("name", list(PRESETS))
def test_variant_params_and_224_forward(name):
    model = build_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    paper = PAPER[name][0] * 1e6
    assert abs(params / paper - 1) < 0.05, f"{name}: {params / 1e6:.2f}M vs the paper's {paper / 1e6:.0f}M"
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert model.num_landmarks((224, 224)) == [49, 49, 49]  # m = 49 in every SOFT stage (Section 3.3)


def test_released_small_depths_miss_the_paper():
    """The authors' released soft_small (1, 3, 20, 4) is 38.9M, not the paper's 24M: we follow Table 2."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = sum(p.numel() for p in build_model("soft_small", depths=(1, 3, 20, 4)).parameters())
    assert params / 1e6 > 38


@pytest.mark.parametrize("options", [
    {},
    {"landmarks": "avgpool", "norm": "pre", "v_conv": (0, 0, 0)},
    {"landmark_norm": True, "stage4_attention": "soft", "stage4_options": {"window": 2}, "newton_grad": "unrolled"},
], ids=["default", "avgpool-prenorm-novconv", "lnlandmarks-softstage4-unrolled"])
def test_backward_reaches_every_parameter(options):
    model = build_model("soft_tiny", num_classes=10, img_size=64, drop_path=0.0, **options).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {n}"


@pytest.mark.parametrize("hw", [(160, 160), (256, 256), (192, 128)])
def test_other_resolutions(hw):
    model = build_model("soft_tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    m = model.num_landmarks(hw)
    assert m == [(hw[0] // 32) * (hw[1] // 32)] * 3  # stage maps H/4, H/8, H/16 over ratios 8, 4, 2


def test_too_small_input_fails_clearly():
    model = build_model("soft_tiny", img_size=64).eval()
    with pytest.raises(ValueError, match="smaller than the 8x8 landmark window"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown VisionConfig field"):
        preset("soft_tiny", dpeths=(1, 1, 1, 1))


def test_config_round_trip():
    cfg = preset("soft_small", landmarks="avgpool", stage4_attention="soft", stage4_options={"window": 2})
    assert VisionConfig.from_dict(json.loads(json.dumps(config_dict(cfg)))) == cfg


def test_bf16_autocast_forward():
    model = build_model("soft_tiny", num_classes=10, img_size=64).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


# --- the 2D SOFT layer against exact references -----------------------------------------------------------------------

def test_conv_landmarks_follow_the_2d_layout():
    """Landmark (i, j) of a head is the r x r window at rows r i.., columns r j.. of that head's Q map."""
    torch.manual_seed(0)
    attn = SoftAttention2d(16, 2, sampling_ratio=2)
    b, h, H, W, d, r = 2, 2, 4, 6, 8, 2
    q = torch.randn(b, h, H * W, d, dtype=torch.float64)
    attn.double()
    got = attn.landmarks(q, (H, W))  # (b, h, 6, d)
    q_map = q.view(b, h, H, W, d)
    weight = attn.sample.weight  # (d_out, d_in, r, r)
    for i in range(H // r):
        for j in range(W // r):
            window = q_map[:, :, r * i:r * i + r, r * j:r * j + r, :]  # (b, h, r, r, d)
            want = torch.einsum("bhyxc,ocyx->bho", window, weight)
            torch.testing.assert_close(got[:, :, i * (W // r) + j], want)


def test_avgpool_landmarks_are_window_means():
    attn = SoftAttention2d(16, 2, sampling_ratio=2, landmarks="avgpool")
    q = torch.randn(1, 2, 4 * 4, 8)
    want = q.view(1, 2, 2, 2, 2, 2, 8).mean((3, 5)).reshape(1, 2, 4, 8)  # (b, h, H/r, r, W/r, r, d) -> window means
    torch.testing.assert_close(attn.landmarks(q, (4, 4)), want)


def test_every_token_a_landmark_is_exact_gaussian_attention():
    """With r = 1 and identity conv weights, Q~ = Q, and S^ = S A^+ S = S: SOFT equals exact Gaussian attention."""
    torch.manual_seed(0)
    dim, heads, H, W = 16, 2, 3, 3
    attn = SoftAttention2d(dim, heads, sampling_ratio=1, inverse="pinv").double()
    with torch.no_grad():
        attn.sample.weight.copy_(torch.eye(dim // heads, dtype=torch.float64)[:, :, None, None])
    x = (0.3 * torch.randn(2, H * W, dim, dtype=torch.float64)).requires_grad_()
    out = attn(x, (H, W))
    q = attn.W_q(x).view(2, H * W, heads, -1).transpose(1, 2)
    v = attn.W_v(x).view(2, H * W, heads, -1).transpose(1, 2)
    want = attn.ff(gaussian_attention(q, v).transpose(1, 2).reshape(2, H * W, dim))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(out)
    grad_out, = torch.autograd.grad(out, x, g)
    grad_want, = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(grad_out, grad_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("landmark_norm", [False, True])
def test_newton_layer_matches_exact_pseudo_inverse(landmark_norm):
    """A stage-1 layer (56 x 56 map, r = 8, m = 49) with Newton iterations vs torch.linalg.pinv: outputs and input
    gradients. At initialisation the plain-conv landmark matrix has condition number ~600 and the paper's
    initialisation needs more than 20 iterations there (docs/imagenet.md); 40 converge."""
    torch.manual_seed(0)
    attn = SoftAttention2d(64, 2, sampling_ratio=8, v_conv=9, landmark_norm=landmark_norm, iters=40).double()
    x = torch.randn(1, 56 * 56, 64, dtype=torch.float64, requires_grad=True)
    out = attn(x, (56, 56))
    attn.soft_options["inverse"] = "pinv"
    want = attn(x, (56, 56))
    torch.testing.assert_close(out, want, rtol=1e-8, atol=1e-10)
    g = torch.randn_like(out)
    grad_out, = torch.autograd.grad(out, x, g)
    grad_want, = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(grad_out, grad_want, rtol=1e-6, atol=1e-9)


def test_v_conv_is_one_filter_per_head():
    """The depthwise conv of V convolves each of a head's d channels with that head's k x k filter."""
    torch.manual_seed(0)
    attn = SoftAttention2d(8, 2, sampling_ratio=2, v_conv=3, inverse="pinv")
    x = torch.randn(1, 4 * 4, 8)
    with_conv = attn(x, (4, 4))
    conv, attn.v_conv = attn.v_conv, None
    without = attn(x, (4, 4))
    v = attn.W_v(x).view(1, 16, 2, 4).transpose(1, 2)  # (b, h, n, d)
    local = torch.stack([torch.stack([F.conv2d(v[0, head, :, c].view(1, 1, 4, 4), conv.weight[head:head + 1],
                                               padding=1).flatten() for c in range(4)], -1) for head in range(2)])
    want = without + attn.ff(local.transpose(0, 1).reshape(1, 16, 8)) - attn.ff.bias  # ff is linear: split the sum
    torch.testing.assert_close(with_conv, want, rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    x = torch.ones(4000, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs(y.mean().item() - 1.0) < 0.05
    torch.testing.assert_close(drop_path(x, 0.25, training=False), x)


def test_resize_pos_embed():
    pos = torch.randn(1, 7 * 7, 4)
    assert resize_pos_embed(pos, (7, 7), (7, 7)) is pos
    out = resize_pos_embed(pos, (7, 7), (14, 10))
    assert out.shape == (1, 140, 4)
    const = torch.ones(1, 49, 4)
    torch.testing.assert_close(resize_pos_embed(const, (7, 7), (5, 9)), torch.ones(1, 45, 4))


# --- FLOPs and timm --------------------------------------------------------------------------------------------------

def test_tiny_flops_split():
    """Linear + Conv MACs track the paper's 1.9G; attention and Newton iterations come on top (docs/imagenet.md)."""
    p = profile("soft_tiny")
    assert abs(p.dense_flops / 2 / 1.9e9 - 1) < 0.05
    assert 0 < p.newton_flops < p.attention_flops
    # 20 iterations per head and layer (m = 49, d = 32): Algorithm 2 takes 2 m x m x m products per iteration (one may
    # be reused from the initialisation); applied to W = P V without gradients it can take 1 square + thin m x m x d
    # products instead. 2 FLOPs per multiply-accumulate.
    heads_layers = sum(d * h for d, h in zip((1, 2, 3), (2, 4, 10)))
    square, thin = 2 * 49 ** 3 * heads_layers, 2 * 49 ** 2 * 32 * heads_layers
    assert (20 - 1) * square <= p.newton_flops <= 2 * 20 * (square + thin)


def test_timm_registration(monkeypatch):
    """The timm entry points, with a stand-in registry (timm cannot be installed beside this torch build)."""
    registry = {}

    def register_model(fn):
        registry[fn.__name__] = fn
        return fn

    timm = types.ModuleType("timm")
    timm.models = types.ModuleType("timm.models")
    timm.models.register_model = register_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm.models)
    monkeypatch.delitem(sys.modules, "lra_soft.vision.timm_models", raising=False)
    import lra_soft.vision.timm_models  # noqa: F401

    assert set(registry) == set(PRESETS)
    model = registry["soft_tiny"](pretrained=False, num_classes=7, drop_path_rate=0.2, pretrained_cfg=None)
    assert model.cfg.num_classes == 7 and model.cfg.drop_path == 0.2
    with pytest.raises(ValueError, match="no pretrained weights"):
        registry["soft_tiny"](pretrained=True)
