"""Configurations of the SOFT ImageNet backbones: Table 2 of Lu et al. (NeurIPS 2021), one frozen dataclass per size.

Sizes are data (``PRESETS``), not classes. What Table 2 fixes is taken from it: the stem and down-sampling units,
per-stage widths, heads (head dim d_h = 32), depths, sampling ratios 8x8 / 4x4 / 2x2 (so m = 49 at 224 px in every
SOFT stage), feed-forward expansion e = 4 and a class token in stage 4. ``soft_small`` uses the paper's depths
(1, 3, 7, 4), which give its 24M parameters; the authors' released ``soft_small`` uses (1, 3, 20, 4), i.e. 38.9M.

What the paper leaves open is an option here, with the default and the reason next to it:

- ``landmarks = "conv"``: an r x r stride-r convolution without bias over Q's H x W map (Section 3.2: "a convolution
  layer performs better in accuracy. We therefore use a convolution layer by default"). Its weights are shared by the
  heads (d_h -> d_h), which is what gives Table 4b's 13.07M (conv) vs 12.96M (pooling) for Tiny. ``"avgpool"`` is the
  r x r average pooling of Table 4b.
- ``landmark_norm = False``: the authors' code follows the landmark conv with LayerNorm + GELU; the paper describes
  the plain convolution, so the plain convolution is the default and LN + GELU an option. Landmarks are computed
  from the unscaled Q and ``soft_attention`` scales them by d^-1/4 like Q; for the plain conv or pooling this equals
  the authors' order (they are linear), whereas LN + GELU landmarks end up d^-1/4 smaller than the authors' (who
  leave them at unit scale next to scaled queries).
- ``v_conv = (9, 5, 3)``: the authors' code always adds a depthwise k x k convolution of V (one filter per head) to
  the attention output. The paper does not mention it but every reported number comes from code that has it, so it
  is on by default; ``(0, 0, 0)`` removes it.
- ``norm = "post"``: SOFT blocks in the authors' code are post-norm (x = LN(x + f(x))); "pre" is the ViT order.
- ``stage4_attention = "softmax"``: the authors' stage 4 uses standard softmax attention (their code; the paper's
  Table 2 says only "sp. 1x1"). Any key of ``lra_soft.attention.ATTENTION`` can be given, with its options.
- ``iters = 20``: Newton-Raphson iterations in training and evaluation (Section 4.4, Fig. 4; the authors' configs).
- ``drop_path = 0.1``: real stochastic depth, rate ramped linearly over all blocks (the authors' value; in their SOFT
  blocks it acts as element-wise dropout, which is a bug we do not copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    num_classes: int = 1000
    in_chans: int = 3
    img_size: int = 224                             # grid of the learned position embeddings; resized for others
    stem_width: int = 32                            # the stem's 3x3 convs: 3 -> 32 -> 32 -> dims[0]
    dims: tuple[int, ...] = (64, 128, 320, 512)     # widths d of stages 1-4 (Table 2)
    heads: tuple[int, ...] = (2, 4, 10, 16)         # head dim 32 in every stage
    depths: tuple[int, ...] = (1, 2, 3, 2)          # SOFT layers per stage (Tiny)
    sampling_ratios: tuple[int, ...] = (8, 4, 2)    # r in stages 1-3; sp = r x r, m = (H / r)(W / r)
    mlp_ratio: int = 4                              # feed-forward expansion e
    landmarks: str = "conv"                         # "conv" (Section 3.2 default) or "avgpool" (Table 4b)
    landmark_norm: bool = False                     # True: LayerNorm + GELU after the landmark conv (authors' code)
    v_conv: tuple[int, ...] = (9, 5, 3)             # depthwise conv of V per SOFT stage (authors' code); 0 = none
    norm: str = "post"                              # "post" (authors' code) or "pre" LayerNorm in SOFT blocks
    stage4_attention: str = "softmax"               # a key of lra_soft.attention.ATTENTION (authors: softmax)
    stage4_options: dict[str, Any] = field(default_factory=dict)  # options of that attention
    inverse: str = "newton"                         # A^+ by Newton-Raphson (Algorithm 2); passed to soft_attention
    iters: int = 20                                 # Newton-Raphson iterations, training and evaluation
    newton_init: str = "paper"                      # initialisation of A_0 = alpha A (see soft_attention)
    newton_grad: str = "analytic"                   # backward of A^+: analytic inverse gradient, or "unrolled"
    drop_path: float = 0.1                          # stochastic depth, linear ramp 0 -> drop_path over all blocks
    dropout: float = 0.0                            # after position embeddings, attention and feed-forward outputs

    def __post_init__(self):
        if not (len(self.dims) == len(self.heads) == len(self.depths) == 4):
            raise ValueError(f"dims, heads and depths need 4 entries (stages 1-4), got {self.dims}, {self.heads}, "
                             f"{self.depths}")
        if len(self.sampling_ratios) != 3 or len(self.v_conv) != 3:
            raise ValueError(f"sampling_ratios and v_conv need 3 entries (SOFT stages 1-3), got "
                             f"{self.sampling_ratios}, {self.v_conv}")
        for d, h in zip(self.dims, self.heads):
            if d % h:
                raise ValueError(f"stage width {d} is not divisible by its {h} heads")
        if any(k and k % 2 == 0 for k in self.v_conv):
            raise ValueError(f"v_conv kernel sizes must be odd (same padding) or 0, got {self.v_conv}")
        if self.landmarks not in ("conv", "avgpool"):
            raise ValueError(f"landmarks must be 'conv' or 'avgpool', got {self.landmarks!r}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {self.norm!r}")
        if self.img_size < self.min_img_size:
            raise ValueError(f"img_size {self.img_size} is below the smallest input this config accepts "
                             f"({self.min_img_size} px: every SOFT stage needs at least one r x r landmark window)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Inverse of ``dataclasses.asdict`` after a JSON or checkpoint round trip (lists back to tuples)."""
        return cls(**_tuples(d))

    @property
    def min_img_size(self) -> int:
        """Smallest square input whose stage maps hold at least one landmark window each."""
        return max(r * 4 * 2 ** i for i, r in enumerate(self.sampling_ratios))


# Table 2; the paper's parameters (M) and FLOPs (G) of Table 3 are kept beside them for the summary and the tests.
PRESETS: dict[str, VisionConfig] = {
    "soft_tiny": VisionConfig(depths=(1, 2, 3, 2)),
    "soft_small": VisionConfig(depths=(1, 3, 7, 4)),
    "soft_medium": VisionConfig(dims=(64, 128, 288, 512), heads=(2, 4, 9, 16), depths=(1, 3, 29, 5)),
    "soft_large": VisionConfig(depths=(1, 3, 40, 5)),
    "soft_huge": VisionConfig(dims=(64, 128, 352, 512), heads=(2, 4, 11, 16), depths=(1, 5, 49, 5)),
}

PAPER: dict[str, tuple[float, float, float]] = {  # name: (params M, FLOPs G, top-1 %), Table 3
    "soft_tiny": (13.0, 1.9, 79.3),
    "soft_small": (24.0, 3.3, 82.2),
    "soft_medium": (45.0, 7.2, 82.9),
    "soft_large": (64.0, 11.0, 83.1),
    "soft_huge": (87.0, 16.3, 83.3),
}


def preset(name: str, **overrides) -> VisionConfig:
    """A Table 2 configuration, with any field overridden (e.g. ``num_classes=10, img_size=64``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(VisionConfig)})
    if unknown:
        raise ValueError(f"unknown VisionConfig field(s) {unknown} for {name}; valid fields: "
                         f"{[f.name for f in fields(VisionConfig)]}")
    return replace(PRESETS[name], **_tuples(overrides))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
