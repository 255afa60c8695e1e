"""The efficiency targets, read from the result files that ``docs/bench/targets.sh`` writes.

Each target is a ratio measured side by side in one run (CPU, forward+backward, batch 8, 2 heads, head dim 32, ratios
to ``softmax`` = SDPA), so machine load shared by the rows of a run cancels out. The file and row names below are the
``--name`` and ``--attn`` values of the commands in ``targets.sh``.

    python -m lra_soft.bench.targets docs/bench     # prints the table and writes docs/bench/targets.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _row(rows: list[dict[str, Any]], attention: str, n: int, compiled: bool = False) -> dict[str, Any] | None:
    for r in rows:
        if r["attention"] == attention and r["n"] == n and r.get("compiled", False) == compiled and "error" not in r:
            return r
    return None


def _line(target: str, want: str, got: float | None, ok: bool | None, where: str) -> str:
    shown = "not measured" if got is None else f"{got:.2f}"
    verdict = "" if ok is None or got is None else ("met" if ok else "NOT met")
    return f"| {target} | {want} | {shown} | {verdict} | {where} |"


def summarize(directory: Path) -> str:
    """A Markdown table: each target, its threshold, the measured figure and whether it is met."""
    d = Path(directory)
    lines = ["| target | wanted | measured | | file |", "|---|---|---|---|---|"]
    lra = _rows(d / "lra-setting.json")
    solve, newton = _row(lra, "soft:inverse=solve", 4096), _row(lra, "soft", 4096)
    v = solve and solve.get("fwdbwd_x_softmax")
    lines.append(_line("SOFT window 4, inverse=solve, n=4096: time / SDPA", "<= 0.8", v, v is not None and v <= 0.8,
                       "lra-setting"))
    v = newton and newton.get("fwdbwd_x_softmax")
    lines.append(_line("SOFT window 4, newton 20 (m=1024), n=4096, training: time / SDPA", "<= 6", v,
                       v is not None and v <= 6, "lra-setting"))
    m64 = _rows(d / "fixed-m64.json")
    hi, lo, sdpa = _row(m64, "soft:num_landmarks=64", 16384), _row(m64, "soft:num_landmarks=64", 4096), \
        _row(m64, "softmax", 16384)
    v = hi and sdpa and sdpa["fwdbwd_ms"] / hi["fwdbwd_ms"]
    lines.append(_line("SOFT m=64, n=16384: SDPA time / SOFT time", ">= 20", v, v is not None and v >= 20,
                       "fixed-m64"))
    v = hi and sdpa and hi["fwdbwd_mem_mb"] / sdpa["fwdbwd_mem_mb"]
    lines.append(_line("SOFT m=64, n=16384: peak memory / SDPA's", "<= 1.0", v, v is not None and v <= 1.0,
                       "fixed-m64"))
    for key, what in (("fwdbwd_ms", "time"), ("fwdbwd_mem_mb", "peak memory")):
        v = hi and lo and hi[key] / lo[key]
        lines.append(_line(f"SOFT m=64: {what}(16384) / {what}(4096)", "<= 4.5", v, v is not None and v <= 4.5,
                           "fixed-m64"))
    enc = _rows(d / "listops-encoder.json")
    row, paper, softmax = (_row(enc, a, 2048) for a in ("soft:num_landmarks=64", "soft", "softmax"))
    v = row and row.get("items_per_s_x_softmax")
    lines.append(_line("LRA encoder, ListOps n=2048 batch 32, SOFT m=64: tokens/s / softmax's", ">= 4", v,
                       v is not None and v >= 4, "listops-encoder"))
    v = paper and softmax and paper["step_ms"] / softmax["step_ms"]
    lines.append(_line("same, SOFT in the paper's setting (window 4): step time / softmax's", "<= 2.5", v,
                       v is not None and v <= 2.5, "listops-encoder"))
    if (d / "lra-setting.json").exists():
        rate = json.loads((d / "lra-setting.json").read_text())["reference"].get("matmul_gflops_per_s")
        lines.append(_line("float32 matmul rate of the machine, GFLOP/s", "(reference)", rate, None, "lra-setting"))
        for label in ("soft", "soft:inverse=solve"):
            r = _row(lra, label, 4096)
            v = r and r.get("fwdbwd_gflops_per_s")
            lines.append(_line(f"{label}, n=4096: achieved GFLOP/s (fraction of the rate)", "(stated)", v, None,
                               "lra-setting" + (f", {r['fwdbwd_fraction_of_matmul_rate']:.2f}"
                                                if r and "fwdbwd_fraction_of_matmul_rate" in r else "")))
    comp = _rows(d / "compile.json")
    for label in dict.fromkeys(r["attention"] for r in comp):
        eager, compiled = _row(comp, label, 4096), _row(comp, label, 4096, compiled=True)
        v = eager and compiled and eager["fwdbwd_ms"] / compiled["fwdbwd_ms"]
        lines.append(_line(f"{label}, n=4096: eager time / torch.compile time", "(stated)", v, None, "compile"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    table = summarize(directory)
    print(table)
    out = directory / "targets.md"
    tmp = out.with_name(".targets.md.tmp")
    tmp.write_text("Efficiency targets, from the result files of `docs/bench/targets.sh` "
                   "(`python -m lra_soft.bench.targets docs/bench`).\n\n" + table)
    tmp.replace(out)
