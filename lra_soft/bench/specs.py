"""What to benchmark: attention specs ``NAME[:key=value,...]`` plus options shared by every spec that accepts them.

``soft:inverse=solve`` and ``soft:num_landmarks=64`` are two rows of one run, side by side with ``softmax``; an
option given once for the whole run (``--option iters=10``) goes to every chosen attention whose constructor takes it
and fails when none does, so a typo never passes silently. Options are checked against the registry at parse time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lra_soft.attention import ATTENTION, attention_options
from lra_soft.config import parse_options


@dataclass(frozen=True)
class AttentionSpec:
    name: str                                                # a key of lra_soft.attention.ATTENTION
    options: dict[str, Any] = field(default_factory=dict)    # constructor options, validated
    label: str = ""                                          # row label; the spec as written

    def resolved(self) -> dict[str, Any]:
        """Every option of the attention with its value in this spec (defaults filled in)."""
        return {**attention_options(self.name), **self.options}


def _check(name: str, options: dict[str, Any], where: str) -> None:
    if name not in ATTENTION:
        raise ValueError(f"unknown attention {name!r} in {where}; choose from {sorted(ATTENTION)}")
    unknown = sorted(set(options) - set(attention_options(name)))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attention {name!r} in {where}; valid options: "
                         f"{attention_options(name)}")


def parse_specs(attns: list[str], common: list[str] | None = None) -> list[AttentionSpec]:
    """Turn ``--attn`` values and ``--option`` values into validated specs (spec options win over common ones)."""
    if not attns:
        raise ValueError(f"no attention chosen: pass --attn NAME (one of {sorted(ATTENTION)}) at least once")
    shared = parse_options(common or [], "--option")
    specs, taken = [], set()
    for text in attns:
        name, _, rest = text.partition(":")
        own = parse_options([s for s in rest.split(",") if s.strip()], f"--attn {text!r}")
        _check(name.strip(), own, f"--attn {text!r}")
        accepted = {k: v for k, v in shared.items() if k in attention_options(name.strip())}
        taken |= set(accepted)
        specs.append(AttentionSpec(name.strip(), {**accepted, **own}, text.strip()))
    unused = sorted(set(shared) - taken)
    if unused:
        raise ValueError(f"--option {unused} is accepted by none of the chosen attentions "
                         f"{[s.name for s in specs]}; check the spelling with `python cli.py attentions`")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"the same --attn was given twice: {labels}")
    return specs


def parse_lengths(text: str) -> tuple[int, ...]:
    """``1024,2048,4096`` -> (1024, 2048, 4096); every length a positive integer."""
    try:
        lengths = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--lengths {text!r}: give comma-separated positive integers, e.g. 1024,2048,4096") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths {text!r}: give comma-separated positive integers, e.g. 1024,2048,4096")
    return lengths
