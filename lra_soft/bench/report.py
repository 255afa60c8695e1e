"""Benchmark output: a Markdown table, JSON, CSV and log-log plots of time and memory against length.

The plot follows the paper's Figure 1b (memory against the token sequence length, one line per attention) with time
beside it, both on log-log axes with dotted n and n^2 guides through the shortest length of the first line, so linear
and quadratic growth can be read off the slopes. Files are written to a temporary name and moved into place, so an
interrupted run never leaves a half-written result.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from lra_soft import allocator
from lra_soft.atomic import atomic_write_bytes

# Columns of the Markdown table: (row key, header, format).
ATTENTION_COLUMNS = [
    ("attention", "attention", "{}"), ("compiled", "compiled", "{}"), ("n", "n", "{}"), ("m", "m", "{}"),
    ("fwd_ms", "fwd ms", "{:.2f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.2f}"),
    ("fwdbwd_spread", "fwd+bwd q1-q3", "{}"), ("fwd_mem_mb", "fwd MiB", "{:.1f}"),
    ("fwdbwd_mem_mb", "fwd+bwd MiB", "{:.1f}"), ("fwdbwd_x_softmax", "time x softmax", "{:.2f}"),
    ("fwdbwd_mem_x_softmax", "mem x softmax", "{:.2f}"), ("fwdbwd_gflop", "GFLOP", "{:.2f}"),
    ("fwdbwd_gflops_per_s", "GFLOP/s", "{:.1f}"), ("newton_floor_ms", "Newton floor ms", "{:.2f}"),
    ("fwdbwd_x_newton_floor", "x floor", "{:.2f}"), ("graph_breaks", "graph breaks", "{}"),
]
MARKERS = "osD^vPX*"
MODEL_COLUMNS = [
    ("model", "model", "{}"), ("attention", "attention", "{}"), ("n", "n", "{}"), ("batch", "batch", "{}"),
    ("step_ms", "step ms", "{:.1f}"), ("step_spread", "step q1-q3", "{}"), ("items_per_s", "items/s", "{:.1f}"),
    ("unit", "unit", "{}"), ("step_mem_mb", "train MiB", "{:.1f}"), ("infer_ms", "inference ms", "{:.1f}"),
    ("infer_items_per_s", "inference items/s", "{:.1f}"), ("infer_mem_mb", "inference MiB", "{:.1f}"),
    ("items_per_s_x_softmax", "speed x softmax", "{:.2f}"), ("step_mem_x_softmax", "mem x softmax", "{:.2f}"),
]


def environment() -> dict[str, Any]:
    """What the figures depend on: torch, device, threads, the allocator tuning and the git commit measured."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "malloc_tuned": allocator.tuned}
    try:
        root = Path(__file__).resolve().parents[2]
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "lra_soft"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["lra_soft_modified_since_commit"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key.endswith("_spread"):
        prefix = key[: -len("_spread")]
        if f"{prefix}_ms_q1" not in row:
            return ""
        return f"{row[f'{prefix}_ms_q1']:.1f}-{row[f'{prefix}_ms_q3']:.1f}"
    value = row.get(key)
    if value is None:
        return row.get("error", "") if key in ("fwd_ms", "step_ms") else ""
    return fmt.format(value)


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of a result as a Markdown table (empty columns dropped), then the reference figures and growth."""
    rows = result["rows"]
    columns = ATTENTION_COLUMNS if result["mode"] == "attention" else MODEL_COLUMNS
    if not any(r.get("compiled") for r in rows):
        columns = [c for c in columns if c[0] != "compiled"]
    columns = [c for c in columns if any(_cell(r, c[0], c[2]) for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    ref = result.get("reference", {})
    if "matmul_gflops_per_s" in ref:
        lines += ["", f"float32 matmul rate of this machine ({ref.get('matmul_size', '?')}^2, start / "
                      f"end of run): {ref['matmul_gflops_per_s']:.1f} / {ref.get('matmul_gflops_per_s_end', 0):.1f} "
                      "GFLOP/s"]
    if result.get("growth"):
        lines += ["", "| attention | compiled | n range | time ratio | time exponent | memory ratio | memory exponent |",
                  "|---|---|---|---|---|---|---|"]
        for g in result["growth"]:
            lines.append(f"| {g['attention']} | {g['compiled']} | {g['n_lo']}-{g['n_hi']} (x{g['n_ratio']:.2f}) | "
                         f"{g.get('fwdbwd_ms_ratio', float('nan')):.2f} | "
                         f"{g.get('fwdbwd_ms_exponent', float('nan')):.2f} | "
                         f"{g.get('fwdbwd_mem_mb_ratio', float('nan')):.2f} | "
                         f"{g.get('fwdbwd_mem_mb_exponent', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(result, indent=2, default=str) + "\n").encode())


def write_csv(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def plot(result: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Time and peak memory against n, log-log, one line per attention (compiled rows dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    model = result["mode"] != "attention"
    panels = ([("step_ms", "training step (ms)"), ("step_mem_mb", "training peak memory (MiB)")] if model else
              [("fwdbwd_ms", "forward+backward time (ms)"), ("fwdbwd_mem_mb", "forward+backward peak memory (MiB)")])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = dict.fromkeys((r.get("model", ""), r["attention"], r.get("compiled", False)) for r in result["rows"])
    for ax, (key, label) in zip(axes, panels):
        guide = None
        for i, (model_name, attn, compiled) in enumerate(groups):
            pts = sorted((r["n"], r[key]) for r in result["rows"] if r["attention"] == attn and
                         r.get("compiled", False) == compiled and r.get("model", "") == model_name and
                         r.get(key) is not None)
            if not pts:
                continue
            name = f"{model_name} {attn}".strip() + (" (compiled)" if compiled else "")
            # Distinct markers and widths keep lines that coincide (equal memory, say) visible.
            ax.plot(*zip(*pts), "--" if compiled else "-", marker=MARKERS[i % len(MARKERS)], label=name,
                    markersize=6 - 3 * i / max(len(groups), 1), linewidth=2.6 - 1.6 * i / max(len(groups), 1))
            guide = guide or pts[0]
        if guide is not None:
            ns = sorted({r["n"] for r in result["rows"]})
            for power, style in ((1, ":"), (2, "-.")):
                ax.plot(ns, [guide[1] * (x / guide[0]) ** power for x in ns], style, color="gray", linewidth=0.8,
                        label=f"~ n^{power}" if ax is axes[0] else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["n"] for r in result["rows"]})
        ax.set_xticks(ns, [str(x) for x in ns], rotation=45 if len(ns) > 5 else 0, fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(title or (f"{result['device']}: batch {cfg.get('batch')}, heads {cfg.get('heads')}, "
                           f"head dim {cfg.get('head_dim')}, {cfg.get('dtype')}"), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save(result: dict[str, Any], out_dir: Path, stem: str = "bench", command: str | None = None) -> list[Path]:
    """Write ``stem``.json, .csv, .md (table, with the command that made it) and .png into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md", "png")]
    write_json(result, paths[0])
    write_csv(result, paths[1])
    head = f"Command: `{command}`\n\n" if command else ""
    env = result.get("environment", {})
    head += (f"Commit {env.get('commit')}, torch {env.get('torch')}, {env.get('cuda') or env.get('cpu')}, "
             f"{env.get('threads')} threads.\n\n" if env else "")
    atomic_write_bytes(paths[2], (head + markdown_table(result)).encode())
    plot(result, paths[3])
    return paths
