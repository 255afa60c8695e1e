"""Training protocols as data, and the test of whether a run can sit beside the SOFT paper's Table 6.

Table 6 (Lu et al., NeurIPS 2021, Sec. 4.5: "We use the Pytorch version of LRA [29] benchmark, provided by [39]")
comes from the Nystromformer PyTorch harness (``LRA/code`` of mlpen/Nystromformer). Two protocols:

- ``paper`` reproduces that harness: 10% dropout on softmax attention weights (``attention.py``; no other attention
  of the harness has one), every batch padded to the task's fixed length and MEAN pooling over all those positions
  (``model_wrapper.py``), Adam's beta1 cycled 0.95 -> 0.85 -> 0.95 by ``OneCycleLR(cycle_momentum=True)``
  (``run_tasks.py``), fp16 autocast with a GradScaler on CUDA with the attention core kept in float32
  (``attention.py``), black pixels as padding and the IMDb test split as dev (``datasets/*.py``).
- ``clean`` is ours: each change from ``paper`` is listed in ``CLEAN_CHANGES`` with its reason.

A protocol is one frozen ``Protocol`` per (name, task) in ``PROTOCOLS``; the CLI applies it to the task's defaults
before the user's flags, and ``differences`` lists everything that separates a run from the paper's setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lra_soft.attention import attention_options
from lra_soft.config import EncoderConfig, TrainConfig

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
TABLE6_TASKS = ("listops", "text", "retrieval", "image")   # Pathfinder omitted by the paper ("we cannot replicate")

# The harness's padded lengths: max_seq_len rounded up to a power of two (``run_tasks.py``), data zero-padded to it.
HARNESS_LENGTH = {"listops": 2048, "text": 4096, "retrieval": 4096, "image": 1024, "pathfinder": 1024}

# Split sizes of the harness's data (``lra_config.py``; text: 25,000 train and the 25,000 test reviews as dev and
# test). A run on other splits (a fixture, a subset) measures something else.
HARNESS_SPLITS = {"listops": {"train": 96000, "test": 2000}, "text": {"train": 25000, "test": 25000},
                  "retrieval": {"train": 147086, "test": 17437}, "image": {"train": 45000, "test": 10000}}

# Table 6's attention settings, as options of our registry on top of each constructor's defaults (which already are
# the paper's: SOFT window 4 with 20 Newton iterations, Nystrom 64 landmarks, Linformer k 256, Performer 256
# features, Reformer 2 hashes). Softmax's attention dropout comes from the protocol.
TABLE6_ATTENTIONS = ("softmax", "soft", "nystrom", "linformer", "performer", "reformer")

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Protocol:
    name: str
    task: str
    pooling: str                          # "mean_padded" = harness MEAN (sum / padded length); "mean" = real tokens
    pad_to: int                           # every batch padded to this length; 0 = to the longest in the batch
    softmax_attn_dropout: float           # dropout on softmax attention weights (harness: 0.1, softmax only)
    beta1_cycle: tuple[float, float] | None  # (max, base) of OneCycleLR's cycle_momentum; None = beta1 fixed 0.9
    cuda_precision: str                   # "fp16" autocast + GradScaler, "bf16" autocast, "fp32"; CPU is fp32
    attention_fp32: bool                  # the attention runs outside autocast, in float32 (harness)
    data_options: dict[str, Any] = field(default_factory=dict)  # task data options the protocol sets


def _paper(task: str) -> Protocol:
    data = {"image": {"pixel_offset": 0}, "pathfinder": {"pixel_offset": 0}, "text": {"val": "test"}}.get(task, {})
    return Protocol("paper", task, pooling="mean_padded", pad_to=HARNESS_LENGTH[task], softmax_attn_dropout=0.1,
                    beta1_cycle=(0.95, 0.85), cuda_precision="fp16", attention_fp32=True, data_options=data)


def _clean(task: str) -> Protocol:
    return Protocol("clean", task, pooling="mean", pad_to=0, softmax_attn_dropout=0.1, beta1_cycle=(0.95, 0.85),
                    cuda_precision="bf16", attention_fp32=False, data_options={})


PROTOCOLS: dict[str, dict[str, Protocol]] = {
    "paper": {task: _paper(task) for task in TASKS},
    "clean": {task: _clean(task) for task in TASKS},
}

# What ``clean`` changes in ``paper``, and why (also in docs/protocols.md).
CLEAN_CHANGES = (
    ("pooling over real tokens (mean) instead of MEAN over the padded length",
     "the harness's sum / padded length makes the logits depend on how much padding a batch has"),
    ("dynamic padding (to the longest sequence of each batch) instead of the fixed task length",
     "the same results for real tokens, and less compute on short batches"),
    ("bf16 autocast on CUDA, no GradScaler, attention under autocast",
     "bf16 has fp32's range, so no loss scaling and no overflow; Ampere and later GPUs run it at fp16 speed"),
    ("black pixels are tokens (pixel ids offset by one), not padding",
     "the harness masks pixel value 0 out of attention and pooling (Image, Pathfinder)"),
    ("Text: dev is a seeded 10% of the train reviews, not the test split",
     "the harness selects its checkpoint on the test set it then reports"),
)

# What ``paper`` still does differently from the harness, and why (also in docs/protocols.md).
PAPER_DEPARTURES = (
    ("dev accuracy on the whole dev split in order at every evaluation",
     "the harness takes the next 62 batches (ListOps) of an endlessly reshuffled dev loader (run_tasks.py)"),
    ("the best-dev checkpoint is tested on the whole test split",
     "the harness's test loader drops its last partial batch (run_tasks.py, drop_last=True)"),
    ("epochs in a seeded order (DistributedSampler permutation per epoch)",
     "the harness reshuffles with Python's unseeded random.shuffle (dataset.py)"),
    ("exact vocabularies (ListOps 16 ids, bytes 257 or 256) instead of vocab_size 32 or 512",
     "unused embedding rows change nothing but the parameter count (lra_config.py)"),
    ("a fixed, sorted ListOps vocabulary",
     "the official ids follow Python's hash-randomised set order per process"),
    ("on CPU everything runs in float32", "fp16 autocast exists on CUDA only"),
    ("on CUDA the attention's projections run in float32 with its core",
     "the harness computes W_q, W_k, W_v and the output projection under fp16 autocast, only the core in float32"),
    ("no gradient accumulation or nn.DataParallel; DDP through torchrun",
     "the same global batch, averaged the same way (run_tasks.py accumulates to fit GPU memory)"),
)


def get_protocol(name: str, task: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    if task not in PROTOCOLS[name]:
        raise ValueError(f"protocol {name!r} has no task {task!r}; choose from {list(PROTOCOLS[name])}")
    return PROTOCOLS[name][task]


def apply(protocol: Protocol, model: EncoderConfig, train: TrainConfig) -> tuple[EncoderConfig, TrainConfig]:
    """The task's defaults under ``protocol`` (before the user's flags)."""
    options = dict(model.attention_options)
    if model.attention == "softmax":
        options.setdefault("attn_dropout", protocol.softmax_attn_dropout)
    model = replace(model, pooling=protocol.pooling, attention_fp32=protocol.attention_fp32,
                    attention_options=options)
    train = replace(train, protocol=protocol.name, pad_to=min(protocol.pad_to, model.max_len) if protocol.pad_to
                    else 0, beta1_cycle=protocol.beta1_cycle, precision=protocol.cuda_precision)
    return model, train


def paper_setting(task: str, attention: str, model: EncoderConfig, train: TrainConfig
                  ) -> tuple[EncoderConfig, TrainConfig]:
    """Table 6's configuration of ``attention`` on ``task``: the task's defaults under the paper protocol."""
    return apply(PROTOCOLS["paper"][task], replace(model, attention=attention, attention_options={}), train)


def _fmt(value: Any) -> str:
    return "none" if value is None else str(list(value) if isinstance(value, tuple) else value)


def differences(task: str, model: EncoderConfig, train: TrainConfig, *, task_model: EncoderConfig,
                task_train: TrainConfig, device: str = "cpu", counts: dict[str, int] | None = None,
                data_options: dict[str, Any] | None = None) -> list[str]:
    """Everything that separates a run from the paper's Table 6 setting; empty = comparable with Table 6.

    ``task_model``/``task_train`` are the task module's defaults; ``counts`` the run's split sizes and ``data_options``
    the resolved data options its cache was prepared with (``manifest.json``); None skips those checks.
    """
    if task not in TABLE6_TASKS:
        return [f"task {task} is not in Table 6 (the paper reports {', '.join(TABLE6_TASKS)})"]
    if model.attention not in TABLE6_ATTENTIONS:
        return [f"attention {model.attention} is not in Table 6"]
    ref_model, ref_train = paper_setting(task, model.attention, task_model, task_train)
    diffs = []
    if train.protocol != "paper":
        diffs.append(f"protocol {train.protocol} != paper")
    defaults = attention_options(model.attention)
    ours, ref = {**defaults, **model.attention_options}, {**defaults, **ref_model.attention_options}
    diffs += [f"{k}={_fmt(ours.get(k))} (paper {_fmt(ref.get(k))})" for k in sorted(set(ours) | set(ref))
              if ours.get(k) != ref.get(k)]
    for name in ("dim", "depth", "heads", "mlp_dim", "dropout", "pooling", "max_len", "pair"):
        if getattr(model, name) != getattr(ref_model, name):
            diffs.append(f"{name} {_fmt(getattr(model, name))} != {_fmt(getattr(ref_model, name))}")
    for name in ("steps", "warmup", "batch_size", "lr", "weight_decay", "adam_eps", "grad_clip", "eval_every",
                 "eval_batches", "pad_to", "beta1_cycle"):
        if getattr(train, name) != getattr(ref_train, name):
            diffs.append(f"{name} {_fmt(getattr(train, name))} != {_fmt(getattr(ref_train, name))}")
    if device.startswith("cuda"):  # on CPU everything runs in float32 whatever is asked
        if train.precision != ref_train.precision:
            diffs.append(f"precision {train.precision} != {ref_train.precision} on CUDA")
        if model.attention_fp32 != ref_model.attention_fp32:
            diffs.append(f"attention_fp32 {model.attention_fp32} != {ref_model.attention_fp32} on CUDA")
    if data_options is not None:
        for k, v in PROTOCOLS["paper"][task].data_options.items():
            if data_options.get(k) != v:
                diffs.append(f"data option {k}={_fmt(data_options.get(k))} (paper {_fmt(v)})")
    if counts is not None:
        for split, n in HARNESS_SPLITS[task].items():
            if counts.get(split) != n:
                diffs.append(f"{split} examples {_fmt(counts.get(split))} != {n}")
    return diffs


def verdict(protocol: str, task: str, attention: str, diffs: list[str], *, data_checked: bool) -> str:
    """The run's first line: whether it is the paper's Table 6 setting, and if not, why."""
    if diffs:
        return f"protocol {protocol}: not comparable with Table 6 ({'; '.join(diffs)})"
    return (f"protocol {protocol}: the paper's Table 6 setting of {attention} on {task}"
            + ("" if data_checked else " (the data is checked once prepared)"))
