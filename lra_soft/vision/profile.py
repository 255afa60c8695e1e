"""Parameters and FLOPs of the SOFT backbones, counted by ``torch.utils.flop_counter`` (for Tables 2-3 of the paper).

``FlopCounterMode`` counts 2 FLOPs per multiply-accumulate for every matmul, convolution and SDPA call, so the
Gaussian-kernel products, P^T A^+ (P V) and every Newton-Raphson iteration are included. Normalisations,
activations, exp and pooling are not counted. The paper's "FLOPs" follow the usual vision convention of counting
multiply-accumulates (fvcore, ptflops), i.e. half of ``FlopCounterMode``'s number; the summary therefore reports
GMACs beside the paper's G and splits them into the dense layers (Linear and Conv2d modules), the attention
products, and the Newton iterations (measured as the difference between ``iters`` and zero iterations).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lra_soft.vision.config import PAPER, PRESETS, preset
from lra_soft.vision.model import SoftVisionTransformer


@dataclass(frozen=True)
class Profile:
    name: str
    params: int
    flops: int                  # FlopCounterMode total, 2 per multiply-accumulate
    dense_flops: int            # Linear and Conv2d modules only (the convention the paper's numbers track)
    newton_flops: int           # the Newton-Raphson iterations alone
    landmarks: tuple[int, ...]  # m of stages 1-3

    @property
    def attention_flops(self) -> int:
        """Kernel matrices, P^T A^+ (P V), Newton iterations, stage-4 attention: everything not in dense layers."""
        return self.flops - self.dense_flops


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(total FLOPs, FLOPs inside Linear/Conv2d modules) of one forward pass on ``x``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    dense = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            dense += sum(per_module.get(f"{root}.{name}", {}).values())
    return counter.get_total_flops(), dense


def profile(name: str, img_size: tuple[int, int] = (224, 224), **overrides) -> Profile:
    """Parameters, FLOPs at batch 1 and m per stage of one preset (eval mode, no gradients)."""
    cfg = preset(name, **overrides)
    model = SoftVisionTransformer(cfg).eval()
    x = torch.zeros(1, cfg.in_chans, *img_size)
    flops, dense = count_flops(model, x)
    # the same weights with no Newton iteration: the difference is the iterations' cost
    no_newton = SoftVisionTransformer(replace(cfg, iters=0)).eval()
    newton = flops - count_flops(no_newton, x)[0]
    return Profile(name, count_params(model), flops, dense, newton, tuple(model.num_landmarks(img_size)))


def summary_table(names: list[str] | None = None, img_size: tuple[int, int] = (224, 224)) -> str:
    """The params/FLOPs table of ``python cli.py imagenet summary``, beside the paper's Table 3."""
    header = (f"{'model':<12} {'params M':>9} {'paper M':>8} {'diff':>6} {'GMACs':>6} {'dense':>6} {'attn':>6} "
              f"{'newton':>6} {'paper G':>8} {'GFLOPs':>7}  m per SOFT stage")
    rows = [header]
    for name in names or list(PRESETS):
        p = profile(name, img_size)
        paper_params, paper_flops, _ = PAPER[name]
        g = 1e-9 / 2  # FLOPs -> GMACs
        rows.append(f"{name:<12} {p.params / 1e6:>9.2f} {paper_params:>8.0f} "
                    f"{100 * (p.params / 1e6 / paper_params - 1):>+5.1f}% "
                    f"{p.flops * g:>6.2f} {p.dense_flops * g:>6.2f} "
                    f"{p.attention_flops * g:>6.2f} {p.newton_flops * g:>6.2f} {paper_flops:>8.1f} "
                    f"{p.flops * 1e-9:>7.2f}  {'/'.join(map(str, p.landmarks))}")
    return "\n".join(rows)
