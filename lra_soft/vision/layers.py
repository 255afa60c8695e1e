"""Building blocks of the SOFT backbones (Lu et al., NeurIPS 2021, Section 3.3 and Table 2).

- ``ConvBNReLU``: the 3x3 Conv -> BN -> ReLU unit of the stem (strides 2, 1, 2) and of each down-sampling step.
- ``SoftAttention2d``: the SOFT block on an H x W token map. Only landmark sampling is 2D (Section 3.2: Q reshaped to
  H x W x d, an r x r stride-r convolution or average pooling); the attention itself, exp(-||q - k||^2 / 2) of the
  d^-1/4-scaled tokens, the Newton-Raphson pseudo-inverse and P^T A^+ P V, is ``soft_attention``, the same function
  the LRA encoder calls.
- ``SoftLayer``: SOFT block + feed-forward residual block (expansion 4), post- or pre-norm, with stochastic depth.
- ``GlobalLayer``: the stage-4 pre-norm layer over the 7 x 7 tokens plus the class token, with any registered
  attention (softmax in the authors' code).

Shapes: b batch, n = H W tokens, h heads, d head dim, m landmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_soft.attention import build_attention
from lra_soft.attention._common import merge_heads, split_heads
from lra_soft.attention.soft import SoftOptions, soft_attention
from lra_soft.mlp import MLP


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al., 2016): drop the residual branch of whole samples, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias: BN follows) -> BatchNorm -> ReLU; overlapping, padding 1 (Section 3.3)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HeadConv2d(nn.Conv2d):
    """k x k depthwise convolution with one filter per head, shared by that head's d channels (the authors' conv of
    V). Weights (h, 1, k, k) as a grouped Conv2d(h, h); applied to (b, h d, H, W) with each filter repeated d times,
    which CPU and GPU convolution kernels run faster than the equivalent (b d, h, H, W) layout."""

    def __init__(self, heads: int, kernel_size: int):
        super().__init__(heads, heads, kernel_size, padding=kernel_size // 2, groups=heads, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (b, h d, H, W)
        d = x.shape[1] // self.in_channels
        return F.conv2d(x, self.weight.repeat_interleave(d, dim=0), padding=self.padding, groups=x.shape[1])


class SoftAttention2d(nn.Module):
    """SOFT attention with bottleneck tokens sampled from Q's H x W map (Sections 3.2-3.3).

    Q = K (one projection ``W_q``), landmarks Q~ = f_s(Q) by an r x r stride-r convolution (weights shared by the
    heads, no bias) or average pooling, m = floor(H / r) floor(W / r); ``soft_attention`` does the rest. ``v_conv``
    adds the authors' depthwise k x k convolution of V (one filter per head, shared by its d channels).
    ``soft_options`` are the inverse's fields of ``SoftOptions`` (``inverse``, ``iters``, ``newton_init``,
    ``newton_grad``, ``ridge``), with its defaults; the landmarks come from here, so its sampling fields do not apply.
    """

    def __init__(self, dim: int, heads: int, *, sampling_ratio: int, landmarks: str = "conv",
                 landmark_norm: bool = False, v_conv: int = 0, dropout: float = 0.0, **soft_options):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        sampling = sorted(set(soft_options) & {"sampling", "window", "num_landmarks"})
        if sampling:
            raise ValueError(f"SoftAttention2d samples its landmarks on the H x W map (sampling_ratio, landmarks); "
                             f"it takes no {sampling}")
        SoftOptions(**soft_options)  # unknown names and bad values fail here, at construction
        d = dim // heads
        self.heads, self.ratio = heads, sampling_ratio
        self.soft_options = dict(soft_options)
        self.W_q = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        if landmarks == "conv":
            self.sample = nn.Conv2d(d, d, sampling_ratio, stride=sampling_ratio, bias=False)
        elif landmarks == "avgpool":
            self.sample = nn.AvgPool2d(sampling_ratio, stride=sampling_ratio)
        else:
            raise ValueError(f"landmarks must be 'conv' or 'avgpool', got {landmarks!r}")
        self.landmark_norm = nn.Sequential(nn.LayerNorm(d), nn.GELU()) if landmark_norm else nn.Identity()
        self.v_conv = HeadConv2d(heads, v_conv) if v_conv else None
        self.drop = nn.Dropout(dropout)

    def landmarks(self, q: Tensor, hw: tuple[int, int]) -> Tensor:
        """Q~ = f_s(Q): (b, h, n, d) -> (b, h, m, d), sampled on the H x W map of every head."""
        (b, h, _, d), (H, W) = q.shape, hw
        if H < self.ratio or W < self.ratio:
            raise ValueError(f"token map {H}x{W} is smaller than the {self.ratio}x{self.ratio} landmark window; "
                             f"use a larger input image (see VisionConfig.min_img_size)")
        q_map = q.reshape(b * h, H, W, d).permute(0, 3, 1, 2)  # (b h, d, H, W)
        q_tilde = self.sample(q_map).flatten(2).transpose(1, 2)  # (b h, m, d)
        return self.landmark_norm(q_tilde).reshape(b, h, -1, d)  # (b, h, m, d)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        (b, n, _), (H, W) = x.shape, hw
        if n != H * W:
            raise ValueError(f"got {n} tokens for a {H}x{W} map")
        q = split_heads(self.W_q(x), self.heads)  # (b, h, n, d)
        v = split_heads(self.W_v(x), self.heads)  # (b, h, n, d)
        out = soft_attention(q, v, landmarks=self.landmarks(q, hw), **self.soft_options)  # (b, h, n, d)
        if self.v_conv is not None:
            d = v.shape[-1]
            v_map = v.transpose(-1, -2).reshape(b, self.heads * d, H, W)  # (b, h d, H, W)
            out = out + self.v_conv(v_map).reshape(b, self.heads, d, n).transpose(-1, -2)  # (b, h, n, d)
        return self.drop(self.ff(merge_heads(out)))


class SoftLayer(nn.Module):
    """SOFT block + feed-forward block (Section 3.3). Post-norm: x = LN(x + f(x)); pre-norm: x = x + f(LN(x))."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: int, norm: str, drop_path: float, dropout: float,
                 **attention_options):
        super().__init__()
        self.post_norm = {"post": True, "pre": False}[norm]
        self.attn = SoftAttention2d(dim, heads, dropout=dropout, **attention_options)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout, drop_layer=nn.Dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:  # (b, n, dim)
        if self.post_norm:
            x = self.norm1(x + self.drop_path(self.attn(x, hw)))
            return self.norm2(x + self.drop_path(self.mlp(x)))
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GlobalLayer(nn.Module):
    """Stage-4 pre-norm layer on [cls; 7 x 7 tokens]: x + Attn(LN(x)), x + FFN(LN(x)) (the authors' PVT block)."""

    def __init__(self, dim: int, heads: int, *, max_len: int, mlp_ratio: int, attention: str,
                 attention_options: dict, drop_path: float, dropout: float):
        super().__init__()
        self.attn = build_attention(attention, dim, heads, max_len=max_len, dropout=dropout, **attention_options)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout, drop_layer=nn.Dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (b, 1 + n, dim)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Bilinearly resize learned positions (1, gh gw, c) on a gh x gw grid to an H x W map: (1, H W, c)."""
    if tuple(grid) == tuple(hw):
        return pos
    c = pos.shape[-1]
    pos = pos.reshape(1, *grid, c).permute(0, 3, 1, 2)  # (1, c, gh, gw)
    pos = F.interpolate(pos, size=hw, mode="bilinear", align_corners=False)
    return pos.flatten(2).transpose(1, 2)  # (1, H W, c)
