"""Frozen run configurations for the LRA encoder and its training loop.

Defaults are the 2-layer LRA model and optimizer that the SOFT paper follows (Section 4.5: "We follow the
configurations of [39], with 2 layers, 64 and 128 hidden dimension respectively, and 2 attention heads"), i.e. the
Nystromformer PyTorch harness (``LRA/code/lra_config.py``). Each task module in ``tasks/`` overrides what differs per
task with ``dataclasses.replace``; a protocol (``lra_soft.protocol``: pooling, padding, beta1, precision) comes next;
the CLI overrides the rest; the resolved pair is saved as ``config.json`` with every run.

``parse_options`` reads every ``key=value`` flag of the CLI (attention, data, VisionConfig and benchmark options).
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 32            # set from the task's vocabulary (manifest.json)
    num_classes: int = 10
    max_len: int = 2048             # learned positions; the harness rounds data length up to a power of two
    dim: int = 64                   # embedding = model width, as in the 2-layer harness
    depth: int = 2
    heads: int = 2                  # head dim 32
    mlp_dim: int = 128              # feed-forward hidden size
    dropout: float = 0.1            # embeddings, attention output and MLP
    attention: str = "soft"         # a key of lra_soft.attention.ATTENTION
    attention_options: dict[str, Any] = field(default_factory=dict)  # passed to the attention constructor
    pooling: str = "mean"           # "mean" over valid tokens; "mean_padded" = harness (divides by padded length); "cls"
    pair: bool = False              # retrieval: one shared encoder for two documents, head on [x1, x2, x1*x2, x1-x2]
    attention_fp32: bool = False    # run each attention outside autocast in float32 (the harness, under fp16 AMP)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000               # optimizer steps
    warmup: int = 1000              # linear warmup steps, then linear decay (OneCycleLR, anneal "linear")
    batch_size: int = 32            # global batch (split across DDP processes)
    lr: float = 1e-4                # AdamW peak learning rate
    weight_decay: float = 0.0       # the harness uses none
    adam_eps: float = 1e-6          # harness value (PyTorch default is 1e-8)
    grad_clip: float = 0.0          # 0 disables clipping (harness: none)
    eval_every: int = 50            # steps between dev evaluations
    eval_batches: int = 0           # dev batches per evaluation; 0 = the whole dev split
    seed: int = 0
    pad_to: int = 0                 # 0 pads each batch to its longest sequence; >0 pads every batch to this length
    beta1_cycle: tuple[float, float] | None = None  # (max, base): Adam beta1 cycled max -> base -> max with the lr
    #                                                 (OneCycleLR cycle_momentum); None keeps beta1 at 0.9
    precision: str = "bf16"         # CUDA autocast: "fp16" (with a GradScaler), "bf16" or "fp32"; CPU is always fp32
    protocol: str = "none"          # the named protocol (lra_soft.protocol) the run started from, for the record


def _parse_value(text: str) -> Any:
    """A Python literal where ``text`` is one, else the string: ``64`` -> 64, ``1e-6`` -> 1e-06, ``(0,0,0)`` -> a
    tuple, ``exact`` -> "exact". ``true``/``false`` and ``none``/``null`` count in any case."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_options(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``["num_landmarks=64", "inverse=exact"]`` -> ``{"num_landmarks": 64, "inverse": "exact"}``.

    Values as ``_parse_value`` reads them; a later key wins. ``flag`` names where the items came from (``--option``)
    in the error for an item without ``=`` or without a key."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: {item!r} is not of the form key=value")
        out[key.strip()] = _parse_value(raw)
    return out
