"""The learning curve of a run directory: training loss at every step and dev accuracy at every evaluation.

Honest axes: accuracy on 0-100%, loss from zero, so that a 0.6-point change does not look like a collapse and a
run stuck at the majority class looks stuck. The title names the run, the task, the attention (with its options)
and the protocol. Reads ``steps.jsonl`` (one row per optimizer step) when the run has it, else the train loss of
``metrics.jsonl`` (one row per evaluation).

    plot_learning_curve("runs/listops-soft-paper-seed0")   # writes learning_curve.png there
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lra_soft.atomic import atomic_write

SMOOTH_STEPS = 50  # window of the moving average over the per-step loss (the harness's evaluation interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file of a run (metrics.jsonl, steps.jsonl); none when it is missing."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def title_of(run_dir: Path, config: dict[str, Any]) -> str:
    """'RUN: task / attention (options) / protocol P' from config.json (LRA) or the ImageNet recipe's config."""
    model, train = config.get("model", {}), config.get("train", {})
    if "task" in config:
        options = model.get("attention_options") or {}
        attention = model.get("attention", "?") + (
            " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")" if options else "")
        return f"{run_dir.name}: {config['task']} / {attention} / protocol {train.get('protocol', '?')}"
    return f"{run_dir.name}: imagenet / {train.get('model', '?')}"


def plot_learning_curve(run_dir: str | Path, *, loss_key: str = "loss", acc_key: str = "val_acc",
                        acc_scale: float = 100.0, acc_label: str = "dev accuracy (%)", out: str | Path | None = None):
    """learning_curve.png of ``run_dir`` (or ``out``); returns the matplotlib figure (closed, for inspection)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    evals = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in read_jsonl(run_dir / "steps.jsonl") if "loss" in r]
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
        window = min(SMOOTH_STEPS, max(1, len(ys) // 10))
        ax_loss.plot(xs, ys, color="C0", alpha=0.25, linewidth=0.8, label="every step")
        ax_loss.plot(xs, moving_average(ys, window), color="C0", linewidth=1.8,
                     label=f"mean of {window} steps" if window > 1 else "train loss")
    else:
        xs, ys = [r["step"] for r in evals], [r[loss_key] for r in evals]
        ax_loss.plot(xs, ys, color="C0", marker="o" if len(xs) <= 50 else None, label="since the last evaluation")
    ax_loss.set_ylim(bottom=0, top=max(ys, default=1.0) * 1.05 or 1.0)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (from 0)", title="training loss")
    ax_loss.legend(loc="lower left", fontsize=8)

    xs = [r["step"] for r in evals]
    acc = [acc_scale * r[acc_key] for r in evals]
    ax_acc.plot(xs, acc, color="C1", marker="o" if len(xs) <= 50 else None, markersize=4)
    if acc:
        best = max(range(len(acc)), key=acc.__getitem__)
        ax_acc.annotate(f"best {acc[best]:.2f}% at step {xs[best]}", (xs[best], acc[best]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax_acc.set_ylim(0, 100)
    ax_acc.set(xlabel="optimizer step", ylabel=acc_label, title=f"{acc_label.split(' (')[0]} at each evaluation")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    fig.suptitle(title_of(run_dir, config), fontsize=10)
    fig.tight_layout()
    atomic_write(Path(out) if out else run_dir / "learning_curve.png",
                 lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return fig
