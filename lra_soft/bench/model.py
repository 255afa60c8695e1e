"""Model-level benchmark: training throughput and peak memory of whole models, per attention.

- ``lra``: the LRA encoder + classification head (``lra_soft.encoder``) trained with AdamW and cross-entropy on random
  token ids of length n, batch b: one optimizer step of the training engine is timed (``lra_soft.engine.train_step``:
  forward, backward, AdamW step), tokens/s = b n / step time.
  This is the setting of the LRA efficiency tables (LRA paper Table 2: steps/s and memory against length).
- ``imagenet``: the SOFT backbones (``lra_soft.vision``) trained the same way on random images, images/s (the paper's
  Table 1 reports "train throughput / inference throughput" in img/s).
- The paper's Figure 1b protocol is ``FIG1B``: 12 layers, d = 384, h = 12, m = 49, batch 1, n = 784 p for p = 1..8,
  memory against length; here with the LRA encoder's blocks (pre-norm, MLP 4 d) as the ViT layers.

Inference (eval mode, ``torch.no_grad``) is timed beside training. Timed calls are interleaved round-robin across the
models of one length, as in the attention-level benchmark. Peak memory is what one training step (or one inference
forward) allocates above the parameters, gradients-to-be and optimizer state that exist before it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from lra_soft.bench.attention import DTYPES, add_ratios, growth, padding_mask
from lra_soft.bench.measure import peak_memory, time_rounds
from lra_soft.bench.specs import AttentionSpec
from lra_soft.config import EncoderConfig
from lra_soft.distributed import resolve_device
from lra_soft.engine import train_step


@dataclass(frozen=True)
class ModelBenchConfig:
    model: str = "lra"                  # "lra" (LRA encoder, tokens/s) or "imagenet" (SOFT backbones, images/s)
    lengths: tuple[int, ...] = (2048,)  # lra: sequence lengths; imagenet: square image sizes in pixels
    batch: int = 32                     # the ListOps training setting: batch 32 at n = 2048
    dim: int = 64                       # lra encoder width, depth, heads, MLP: the paper's 2-layer LRA setting
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 128
    vocab_size: int = 32                # ListOps-sized vocabulary
    num_classes: int = 10
    dropout: float = 0.1                # as in training
    variants: tuple[str, ...] = ("soft_tiny",)  # imagenet: keys of lra_soft.vision.PRESETS
    vision_options: dict[str, Any] = field(default_factory=dict)  # imagenet: VisionConfig fields overridden
    dtype: str = "float32"
    autocast: str = "none"              # "bfloat16" / "float16": torch.autocast around forward and loss
    device: str = "auto"
    mask: bool = False                  # lra: pad the batch (lengths n down to about n / 2)
    warmup: int = 1                     # untimed steps (the first AdamW step also allocates its state)
    repeats: int = 3
    memory: bool = True
    inference: bool = True              # also time eval-mode forward
    compile: bool = False               # torch.compile each model (timed after warm-up)
    compile_backend: str = "inductor"
    lr: float = 1e-4

    def __post_init__(self):
        if self.model not in ("lra", "imagenet"):
            raise ValueError(f"model {self.model!r} unknown; choose lra or imagenet")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; choose from {sorted(DTYPES)}")
        if self.autocast not in {"none", "bfloat16", "float16"}:
            raise ValueError(f"autocast {self.autocast!r} unknown; choose none, bfloat16 or float16")
        if min(self.batch, self.repeats, self.dim, self.depth, self.heads) < 1 or self.warmup < 1:
            raise ValueError("batch, repeats, dim, depth and heads must be >= 1, and warmup >= 1 (AdamW allocates "
                             "its state in the first step, which must not be timed)")


# Paper Section 4.2, second setting (Figure 1b): "12 attention layers with hidden dimension d = 384, heads h = 12,
# bottleneck token sequence length m = 49 ... a token sequence length of 784 x p where p = 1, ..., 8 ... batch size 1".
FIG1B = ModelBenchConfig(model="lra", lengths=tuple(784 * p for p in range(1, 9)), batch=1, dim=384, depth=12,
                         heads=12, mlp_dim=4 * 384, dropout=0.0)
FIG1B_ATTENTIONS = ("soft:num_landmarks=49", "softmax", "softmax:fused=False", "nystrom:num_landmarks=49",
                    "linformer", "performer")


class _Trainer:
    """One model at one size: its optimizer, a fixed random batch, a training step and an inference forward."""

    def __init__(self, model: torch.nn.Module, inputs: tuple, labels: torch.Tensor, cfg: ModelBenchConfig,
                 device: torch.device):
        self.model = model.to(device, DTYPES[cfg.dtype])
        self.run = torch.compile(self.model, backend=cfg.compile_backend) if cfg.compile else self.model
        self.inputs, self.labels = inputs, labels
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.amp_dtype = DTYPES.get(cfg.autocast)
        self.device = device

    def _amp(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(model(*inputs).float(), self.labels)
        return loss, loss.detach()[None]

    def step(self) -> None:
        """The training engine's own optimizer step (forward, backward, AdamW), on the fixed batch."""
        train_step(self.run, self.opt, [self.inputs], self._loss, autocast=self._amp)

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad(), self._amp():
            self.run(*self.inputs)


def _encoder_trainer(enc: EncoderConfig, batch: int, n: int, cfg: ModelBenchConfig, device: torch.device
                     ) -> _Trainer:
    """The LRA classifier ``enc`` on a random batch of ``batch`` sequences of n tokens (two per example when
    ``enc.pair``, as Retrieval's)."""
    from lra_soft.encoder import build_model

    inputs = []
    for _ in range(2 if enc.pair else 1):
        ids = torch.randint(0, enc.vocab_size, (batch, n), device=device)  # (b, n)
        mask = padding_mask(batch, n, device) if cfg.mask else torch.ones(batch, n, dtype=torch.bool, device=device)
        inputs += [ids, mask]
    labels = torch.randint(0, enc.num_classes, (batch,), device=device)
    return _Trainer(build_model(enc), tuple(inputs), labels, cfg, device)


def _lra_trainer(spec: AttentionSpec, n: int, cfg: ModelBenchConfig, device: torch.device) -> _Trainer:
    enc = EncoderConfig(vocab_size=cfg.vocab_size, num_classes=cfg.num_classes, max_len=n, dim=cfg.dim,
                        depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                        attention=spec.name, attention_options=dict(spec.options))
    return _encoder_trainer(enc, cfg.batch, n, cfg, device)


def time_encoder_step(enc: EncoderConfig, batch: int, n: int, *, device: str = "auto", autocast: str = "none",
                      warmup: int = 1, repeats: int = 2) -> dict[str, Any]:
    """Measured seconds of one training step (the engine's ``train_step``: forward, backward, AdamW) and of one
    inference forward of the LRA classifier ``enc`` on a random batch of ``batch`` x n tokens, on ``device``.

    What ``grid --dry-run`` multiplies into the cost of a run. Returns ``{"step_s", "infer_s", "device"}``, or
    ``{"error": "out of memory", "device"}`` when one step does not fit."""
    dev = resolve_device(device)
    cfg = ModelBenchConfig(batch=batch, dropout=enc.dropout, autocast=autocast, device=device, warmup=warmup,
                           repeats=repeats)
    try:
        trainer = _encoder_trainer(enc, batch, n, cfg, dev)
        timings = time_rounds({"step": trainer.step, "infer": trainer.infer}, dev, warmup=warmup, repeats=repeats)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        return {"error": "out of memory", "device": str(dev)}
    return {"step_s": timings["step"].median, "infer_s": timings["infer"].median, "device": str(dev)}


def _vision_trainer(variant: str, size: int, cfg: ModelBenchConfig, device: torch.device) -> _Trainer:
    from lra_soft.vision import build_model

    model = build_model(variant, **{"num_classes": cfg.num_classes, **cfg.vision_options})
    images = torch.randn(cfg.batch, 3, size, size, device=device, dtype=DTYPES[cfg.dtype])  # (b, 3, H, W)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    return _Trainer(model, (images,), labels, cfg, device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) or \
        "out of memory" in str(err).lower()


def bench_models(builders: dict[str, Callable[[], _Trainer]], base_row: Callable[[str], dict[str, Any]],
                 items_per_step: int, unit: str, cfg: ModelBenchConfig, device: torch.device,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build, warm up and time every model of one size round-robin; one row per model."""
    trainers, rows = {}, []
    for label, build in builders.items():
        try:
            trainer = build()
            trainer.step()  # fails fast before the timed rounds; allocates AdamW state
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            log(f"{label}: out of memory, skipped")
            rows.append({**base_row(label), "error": "out of memory"})
            continue
        trainers[label] = trainer
    fns: dict[str, Callable[[], None]] = {f"{k}|step": t.step for k, t in trainers.items()}
    if cfg.inference:
        fns.update({f"{k}|infer": t.infer for k, t in trainers.items()})
    timings = time_rounds(fns, device, warmup=cfg.warmup - 1, repeats=cfg.repeats)
    for label, t in trainers.items():
        step = timings[f"{label}|step"]
        row = {**base_row(label), "unit": unit, "step_ms": step.median * 1e3, "step_ms_q1": step.q1 * 1e3,
               "step_ms_q3": step.q3 * 1e3, "items_per_s": items_per_step / step.median,
               "params_m": sum(p.numel() for p in t.model.parameters()) / 1e6}
        if cfg.inference:
            infer = timings[f"{label}|infer"]
            row.update(infer_ms=infer.median * 1e3, infer_items_per_s=items_per_step / infer.median)
        if cfg.memory:
            t.opt.zero_grad(set_to_none=True)  # last step's gradients are freed before, not inside, the measurement
            row["step_mem_mb"] = peak_memory(t.step, device) / 2**20
            if cfg.inference:
                row["infer_mem_mb"] = peak_memory(t.infer, device) / 2**20
        rows.append(row)
    return rows


def _add_model_ratios(rows: list[dict[str, Any]], baseline: str = "softmax") -> None:
    base = {r["n"]: r for r in rows if r["attention"] == baseline and "error" not in r}
    for r in rows:
        b = base.get(r["n"])
        if b is None or "error" in r:
            continue
        r[f"items_per_s_x_{baseline}"] = r["items_per_s"] / b["items_per_s"]
        if "step_mem_mb" in r and b.get("step_mem_mb"):
            r[f"step_mem_x_{baseline}"] = r["step_mem_mb"] / b["step_mem_mb"]


def run_model_bench(specs: list[AttentionSpec], cfg: ModelBenchConfig, log: Callable[[str], None] = lambda s: None,
                    progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> dict[str, Any]:
    """The whole model-level run; a JSON-ready dict like ``run_attention_bench``'s. ``progress`` wraps the lengths."""
    device = resolve_device(cfg.device)
    rows: list[dict[str, Any]] = []
    for n in progress(cfg.lengths):
        log(f"{cfg.model} n={n}: building and timing")
        if cfg.model == "lra":
            builders = {s.label: (lambda s=s: _lra_trainer(s, n, cfg, device)) for s in specs}
            specs_by_label = {s.label: s for s in specs}

            def base_row(label: str, n: int = n) -> dict[str, Any]:
                spec = specs_by_label[label]
                return {"model": "lra", "attention": label, "name": spec.name, "options": spec.resolved(),
                        "n": n, "batch": cfg.batch, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                        "dtype": cfg.dtype, "autocast": cfg.autocast, "device": str(device), "compiled": cfg.compile}

            rows += bench_models(builders, base_row, cfg.batch * n, "tokens/s", cfg, device, log)
        else:
            builders = {v: (lambda v=v: _vision_trainer(v, n, cfg, device)) for v in cfg.variants}

            def base_row(label: str, n: int = n) -> dict[str, Any]:
                # n is the stage-1 token count of an n x n image (stem stride 4), img_size the side in pixels.
                return {"model": label, "attention": label, "n": (n // 4) ** 2, "img_size": n, "batch": cfg.batch,
                        "dtype": cfg.dtype, "autocast": cfg.autocast, "device": str(device),
                        "compiled": cfg.compile}

            rows += bench_models(builders, base_row, cfg.batch, "images/s", cfg, device, log)
    if cfg.model == "lra":
        _add_model_ratios(rows)
    grow = growth([{**r, "fwdbwd_ms": r.get("step_ms"), "fwdbwd_mem_mb": r.get("step_mem_mb")} for r in rows
                   if "error" not in r])
    return {"mode": "model", "config": asdict(cfg), "device": str(device), "specs": [asdict(s) for s in specs],
            "reference": {}, "rows": rows, "growth": grow}


def fig1b_config(**overrides) -> ModelBenchConfig:
    """The Figure 1b protocol, any field overridden (e.g. fewer lengths or repeats on a CPU)."""
    return replace(FIG1B, **overrides)
