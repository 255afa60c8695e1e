"""Batch augmentation and loss of the ImageNet recipe: mixup (Zhang et al., 2018), CutMix (Yun et al., 2019) and label
smoothing (Szegedy et al., 2016), as in the DeiT code base the paper trains with (Section 4.1).

Each batch is mixed with itself reversed: with probability ``prob``, CutMix (chance ``switch_prob``) or mixup, with
lam ~ Beta(alpha, alpha). CutMix pastes one box and sets lam to the area actually kept. Targets are label-smoothed
one-hot vectors (off = eps / C, on = 1 - eps + eps / C) mixed with the same lam; the loss is cross-entropy against
these soft targets. Randomness comes from torch's global generator, saved in checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Label-smoothed one-hot targets (b, C), the same distribution ``F.cross_entropy(label_smoothing=...)`` uses."""
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c t_c log softmax(z)_c, in float32."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) covering about 1 - lam of the image, centred uniformly, clipped to it."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(0, height, ()).item()), int(torch.randint(0, width, ()).item())
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return top, bottom, left, right


class MixupCutmix:
    """(images, labels) -> (mixed images, soft targets); the defaults are the DeiT / SOFT recipe."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"need alphas >= 0 and probabilities in [0, 1]; got mixup_alpha={mixup_alpha}, "
                             f"cutmix_alpha={cutmix_alpha}, prob={prob}, switch_prob={switch_prob}")
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        targets = smooth_one_hot(y, self.num_classes, self.smoothing)  # (b, C)
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return x, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if use_cutmix:
            top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam)
            x = x.clone()
            x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
        else:
            x = lam * x + (1.0 - lam) * x.flip(0)
        return x, lam * targets + (1.0 - lam) * targets.flip(0)
