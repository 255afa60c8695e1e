"""The SOFT pyramidal backbone (Lu et al., NeurIPS 2021, Section 3.3, Table 2).

    image -> stem (3 x [3x3 Conv-BN-ReLU], strides 2, 1, 2; /4)
          -> stage 1: + pos, SOFT layers (sp 8x8)      56 x 56 x 64 at 224 px
          -> [3x3 s2 Conv-BN-ReLU] stage 2 (sp 4x4)    28 x 28 x 128
          -> [3x3 s2 Conv-BN-ReLU] stage 3 (sp 2x2)    14 x 14 x 320 (288, 352)
          -> [3x3 s2 Conv-BN-ReLU] stage 4: [cls; 7 x 7] + pos, global layers, LN -> cls -> Linear

Every stage has its own learned position embedding on the grid of ``img_size``, bilinearly resized when the input
has another size (so 160, 256 or non-square inputs work; m then follows the map size). Initialisation: Linear
weights truncated normal (std 0.02) with zero bias, position embeddings and the class token truncated normal 0.02,
LayerNorm (1, 0), convolutions PyTorch's default, as in the authors' code.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor, nn

from lra_soft.vision.config import VisionConfig, preset
from lra_soft.vision.layers import ConvBNReLU, GlobalLayer, SoftLayer, resize_pos_embed


class SoftStage(nn.Module):
    """Down-sampling unit, learned positions and SOFT layers on an H x W map (stages 1-3)."""

    def __init__(self, downsample: nn.Module, dim: int, heads: int, grid: tuple[int, int], *,
                 drop_paths: list[float], cfg: VisionConfig, ratio: int, v_conv: int):
        super().__init__()
        self.downsample = downsample
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            SoftLayer(dim, heads, mlp_ratio=cfg.mlp_ratio, norm=cfg.norm, drop_path=p, dropout=cfg.dropout,
                      sampling_ratio=ratio, landmarks=cfg.landmarks, landmark_norm=cfg.landmark_norm,
                      v_conv=v_conv, inverse=cfg.inverse, iters=cfg.iters, newton_init=cfg.newton_init,
                      newton_grad=cfg.newton_grad)
            for p in drop_paths)
        # pre-norm layers leave the residual stream un-normalised; normalise it before the next convolution
        self.norm = nn.LayerNorm(dim) if cfg.norm == "pre" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)  # (b, c, H, W)
        b, c, H, W = x.shape
        x = self.pos_drop(x.flatten(2).transpose(1, 2) + resize_pos_embed(self.pos_embed, self.grid, (H, W)))
        for layer in self.layers:
            x = layer(x, (H, W))  # (b, H W, c)
        return self.norm(x).transpose(1, 2).reshape(b, c, H, W)


class GlobalStage(nn.Module):
    """Stage 4: down-sampling, class token, learned positions, global attention layers, final LayerNorm."""

    def __init__(self, downsample: nn.Module, dim: int, heads: int, grid: tuple[int, int], *,
                 drop_paths: list[float], cfg: VisionConfig):
        super().__init__()
        self.downsample = downsample
        self.grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))  # slot 0: the class token
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            GlobalLayer(dim, heads, max_len=1 + grid[0] * grid[1], mlp_ratio=cfg.mlp_ratio,
                        attention=cfg.stage4_attention, attention_options=dict(cfg.stage4_options), drop_path=p,
                        dropout=cfg.dropout)
            for p in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)  # (b, c, H, W)
        b, _, H, W = x.shape
        pos = torch.cat([self.pos_embed[:, :1], resize_pos_embed(self.pos_embed[:, 1:], self.grid, (H, W))], dim=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)  # (b, 1 + H W, c)
        x = self.pos_drop(x + pos)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x[:, 0])  # (b, c)


class SoftVisionTransformer(nn.Module):
    """SOFT backbone of Table 2: stem, three SOFT stages, a global stage with class token, linear classifier."""

    def __init__(self, cfg: VisionConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VisionConfig()  # Tiny by default
        dims, heads, depths = cfg.dims, cfg.heads, cfg.depths
        rates = [cfg.drop_path * i / max(1, sum(depths) - 1) for i in range(sum(depths))]  # linear ramp
        per_stage = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(4)]
        grids = [(_conv_out(cfg.img_size, i),) * 2 for i in range(4)]
        stem = nn.Sequential(ConvBNReLU(cfg.in_chans, cfg.stem_width, 2), ConvBNReLU(cfg.stem_width, cfg.stem_width, 1),
                             ConvBNReLU(cfg.stem_width, dims[0], 2))
        self.stages = nn.ModuleList()
        for i in range(3):
            down = stem if i == 0 else ConvBNReLU(dims[i - 1], dims[i], 2)
            self.stages.append(SoftStage(down, dims[i], heads[i], grids[i], drop_paths=per_stage[i],
                                         cfg=cfg, ratio=cfg.sampling_ratios[i], v_conv=cfg.v_conv[i]))
        self.stages.append(GlobalStage(ConvBNReLU(dims[2], dims[3], 2), dims[3], heads[3], grids[3],
                                       drop_paths=per_stage[3], cfg=cfg))
        self.head = nn.Linear(dims[3], cfg.num_classes)
        self.apply(_init_weights)
        for stage in self.stages:
            nn.init.trunc_normal_(stage.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.stages[3].cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides biases and norms: positions and the class token."""
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "cls_token"))}

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x  # (b, dims[3]): the normalised class token

    def forward(self, x: Tensor) -> Tensor:  # (b, 3, H, W) -> (b, num_classes)
        return self.head(self.forward_features(x))

    def num_landmarks(self, hw: tuple[int, int]) -> list[int]:
        """m of each SOFT stage for an H x W input (stage 4 has no bottleneck)."""
        H, W = hw
        out = []
        for i, r in enumerate(self.cfg.sampling_ratios):
            h, w = _conv_out(H, i), _conv_out(W, i)
            out.append((h // r) * (w // r))
        return out


def _conv_out(size: int, stage: int) -> int:
    """Side of stage ``stage``'s map: the stem halves twice, each later stage once (3x3, padding 1: ceil)."""
    for _ in range(2 + stage):
        size = (size - 1) // 2 + 1
    return size


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_model(name: str = "soft_tiny", **overrides) -> SoftVisionTransformer:
    """A Table 2 backbone by name (``soft_tiny`` ... ``soft_huge``), any ``VisionConfig`` field overridden."""
    return SoftVisionTransformer(preset(name, **overrides))


def config_dict(cfg: VisionConfig) -> dict:
    """JSON-ready form of a config, saved with every checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
