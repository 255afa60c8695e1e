"""The eval-all tables: runs grouped by experiment, over seeds, beside the SOFT paper's Table 6 only when comparable.

Table 6 (Lu et al., NeurIPS 2021, Sec. 4.5) reports test accuracy (%) of the 2-layer LRA protocol of Nystromformer's
PyTorch harness on four tasks (Pathfinder omitted: "we cannot replicate the result of Nyströmformer"). A run
directory is any directory holding ``results.json`` and ``config.json`` written by ``lra_soft.train.fit``.

Runs form one group when everything that defines the experiment is equal: task, attention and its options, protocol,
model size, pooling, padding, steps, warmup, batch, lr, beta1, precision, evaluation cadence and the data (its
options, split sizes and tokenizer); only the seed may differ. A group sits beside the paper's figure only when its
runs are comparable with Table 6 (``lra_soft.protocol.differences`` is empty); every other group goes into a second
table with its differences listed, so a 2-step fixture run can never look like an LRA result.

``save`` writes the table as Markdown, JSON and CSV and plots it (mean test accuracy per task and attention, error
bars of one standard deviation over seeds, the paper's figure marked on comparable bars); ``eval-all`` and ``grid``
both use it.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from lra_soft.atomic import atomic_write, atomic_write_text
from lra_soft.protocol import TABLE6_TASKS

# Paper Table 6, test accuracy (%); keys are this toolkit's attention names.
PAPER_TABLE6: dict[str, dict[str, float]] = {
    "softmax": {"listops": 37.10, "text": 65.02, "retrieval": 79.35, "image": 38.20},    # "Transformer"
    "reformer": {"listops": 19.05, "text": 64.88, "retrieval": 78.64, "image": 43.29},
    "linformer": {"listops": 37.25, "text": 55.91, "retrieval": 79.37, "image": 37.84},
    "performer": {"listops": 18.80, "text": 63.81, "retrieval": 78.62, "image": 37.07},
    "nystrom": {"listops": 37.15, "text": 65.52, "retrieval": 79.56, "image": 41.58},
    "soft": {"listops": 37.40, "text": 63.49, "retrieval": 81.77, "image": 46.91},
}
PAPER_AVERAGE = {"softmax": 54.92, "reformer": 51.47, "linformer": 52.59, "performer": 49.58, "nystrom": 55.95,
                 "soft": 57.39}  # as printed; equals the mean of the four figures up to rounding

MODEL_KEYS = ("dim", "depth", "heads", "mlp_dim", "dropout", "pooling", "max_len", "attention_fp32")
TRAIN_KEYS = ("steps", "warmup", "batch_size", "lr", "weight_decay", "adam_eps", "grad_clip",
              "eval_every", "eval_batches", "pad_to", "beta1_cycle")  # precision: what ran, from results.json
CSV_FIELDS = ("comparable", "task", "attention", "options", "protocol", "steps", "batch_size", "lr", "n", "seeds",
              "mean", "std", "paper", "diff", "differences", "runs")


def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run under ``root`` (recursively): its results.json, config.json and directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist; train first (`cli.py train ...`) or pass "
                                "--runs DIR")
    return [read_run(path.parent) for path in sorted(root.rglob("results.json"))]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One finished run: its results.json, config.json (empty if absent) and directory."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    try:
        res = json.loads((run_dir / "results.json").read_text())
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir} holds a file that is not valid JSON ({e}); delete the run or re-run it") from e
    return {"results": res, "config": config, "run_dir": str(run_dir)}


def experiment(run: dict[str, Any]) -> dict[str, Any]:
    """Everything that defines a run's experiment (all but the seed), as plain JSON values."""
    res, cfg = run["results"], run["config"]
    model, train, data = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {})
    return {"task": res["task"], "attention": res["attention"], "options": dict(sorted(
                (res.get("attention_options") or {}).items())),
            "protocol": res.get("protocol", train.get("protocol", "none")),
            **{k: model.get(k) for k in MODEL_KEYS}, **{k: train.get(k) for k in TRAIN_KEYS},
            "precision_used": res.get("precision"),
            "data": {k: data.get(k) for k in ("counts", "options", "tokenizer_version")}}


def _options(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment: mean, standard deviation (n - 1; None for one run) and n of test accuracy (%) over
    seeds; the paper's figure and the difference only for comparable experiments."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(json.dumps(experiment(run), sort_keys=True), []).append(run)
    rows = []
    for key, members in groups.items():
        exp = json.loads(key)
        accs = [100.0 * m["results"]["test_acc"] for m in members]
        comparable = all(m["results"].get("comparable") is True for m in members)
        diffs = members[0]["results"].get("differences", ["recorded before protocols existed"])
        paper = PAPER_TABLE6.get(exp["attention"], {}).get(exp["task"]) if comparable else None
        mean = statistics.fmean(accs)
        rows.append({"comparable": comparable, "task": exp["task"], "attention": exp["attention"],
                     "options": _options(exp["options"]), "protocol": exp["protocol"], "steps": exp["steps"],
                     "batch_size": exp["batch_size"], "lr": exp["lr"], "n": len(accs),
                     "seeds": sorted(m["results"].get("seed") for m in members), "mean": mean,
                     "std": statistics.stdev(accs) if len(accs) > 1 else None, "paper": paper,
                     "diff": None if paper is None else mean - paper, "differences": [] if comparable else diffs,
                     "experiment": exp, "runs": sorted(m["run_dir"] for m in members)})
    return sorted(rows, key=lambda r: (not r["comparable"], r["task"], r["attention"], r["options"], r["protocol"],
                                       r["steps"] or 0))


def averages(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per attention (comparable rows only): the mean over Table 6's four tasks when all four have one."""
    out = {}
    for attention in sorted({r["attention"] for r in rows if r["comparable"]}):
        accs = {r["task"]: r["mean"] for r in rows if r["comparable"] and r["attention"] == attention
                and r["task"] in TABLE6_TASKS}
        ours = statistics.fmean(accs.values()) if len(accs) == len(TABLE6_TASKS) else None
        paper = PAPER_AVERAGE.get(attention)
        out[attention] = {"mean": ours, "tasks": len(accs), "paper": paper,
                          "diff": None if ours is None or paper is None else ours - paper}
    return out


def _fmt(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _acc(row: dict[str, Any]) -> str:
    return f"{_fmt(row['mean'])} ± {_fmt(row['std'])} (n={row['n']})"


def _run_names(row: dict[str, Any]) -> str:
    """The row's run directories by name, so that a reader finds the runs behind a figure."""
    return ", ".join(Path(d).name for d in row["runs"])


def markdown(rows: list[dict[str, Any]]) -> str:
    """Two tables: comparable experiments beside Table 6 (with the four-task average), then the rest with their
    differences from the paper's setting."""
    good, other = [r for r in rows if r["comparable"]], [r for r in rows if not r["comparable"]]
    lines = ["## Comparable with the paper's Table 6", ""]
    if good:
        lines += ["| task | attention | test acc. % (mean ± std, n seeds) | paper | diff | runs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['attention']} | {_acc(r)} | {_fmt(r['paper'])} | {_fmt(r['diff'], True)} | "
                  f"{_run_names(r)} |" for r in good]
        avg = {a: v for a, v in averages(rows).items() if v["mean"] is not None}
        if avg:
            lines += ["", "| attention | average of the four Table 6 tasks | paper | diff |", "|---|---|---|---|"]
            lines += [f"| {a} | {_fmt(v['mean'])} | {_fmt(v['paper'])} | {_fmt(v['diff'], True)} |"
                      for a, v in avg.items()]
    else:
        lines.append("No run is in the paper's setting (`--protocol paper` with Table 6's steps, batch, lr, warmup, "
                     "model, attention options and data).")
    if other:
        lines += ["", "## Not comparable with the paper's Table 6", "",
                  "| task | attention | options | protocol | steps | test acc. % (mean ± std, n seeds) | "
                  "differences from the paper's setting | runs |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['attention']} | {r['options'] or '–'} | {r['protocol']} | {r['steps']} | "
                  f"{_acc(r)} | {'; '.join(r['differences'])} | {_run_names(r)} |" for r in other]
    lines.append("\nTest accuracy (%) of the best-dev checkpoint on the full test split; std over seeds (n - 1); "
                 "paper = SOFT paper Table 6.")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "seeds": " ".join(map(str, r["seeds"])), "differences": "; ".join(r["differences"]),
                         "runs": " ".join(r["runs"])})
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps({"rows": rows, "averages": averages(rows)}, indent=1) + "\n"


def _bar_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The legend label of each row: attention (options); two experiments of one attention on one task (other
    steps, protocol, ...) get the protocol and steps, then a number, so that no bar hides another."""
    base = [r["attention"] + (f" ({r['options']})" if r["options"] else "") for r in rows]
    clash = Counter((r["task"], b) for r, b in zip(rows, base))
    labels = [b if clash[(r["task"], b)] == 1 else f"{b}, {r['protocol']}, {r['steps']} steps"
              for r, b in zip(rows, base)]
    seen: Counter = Counter()
    out = []
    for r, label in zip(rows, labels):
        seen[(r["task"], label)] += 1
        out.append(label if seen[(r["task"], label)] == 1 else f"{label} #{seen[(r['task'], label)]}")
    return out


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One bar per experiment, grouped by task: mean test accuracy (%) with an error bar of one standard deviation
    over seeds (none for n = 1); a black mark at the paper's figure on comparable bars; not comparable bars hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(TABLE6_TASKS) + sorted({r["task"] for r in rows} - set(TABLE6_TASKS))
    task_names = [t for t in order if any(r["task"] == t for r in rows)]
    labels = _bar_labels(rows)
    legend = list(dict.fromkeys(labels))
    width = 0.8 / max(len(legend), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(task_names) * max(1, len(legend)) ** 0.5 + 2), 4.5))
    for r, label in zip(rows, labels):
        j = legend.index(label)
        x = task_names.index(r["task"]) - 0.4 + width * (j + 0.5)
        ax.bar(x, r["mean"], width * 0.95, yerr=r["std"], capsize=3, color=f"C{j % 10}",
               hatch="" if r["comparable"] else "//", error_kw={"linewidth": 1})
        if r["paper"] is not None:
            ax.plot([x - width * 0.45, x + width * 0.45], [r["paper"]] * 2, color="black", linewidth=2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{j % 10}") for j in range(len(legend))]
    if any(r["paper"] is not None for r in rows):
        handles.append(plt.Line2D([0], [0], color="black", linewidth=2))
        legend = legend + ["paper (Table 6)"]
    ax.legend(handles, legend, fontsize=7, ncol=2)
    ax.set_xticks(range(len(task_names)), task_names)
    ax.set_xlim(-0.5, len(task_names) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ns = sorted({r["n"] for r in rows})
    ax.set_title(f"seeds per bar: {', '.join(map(str, ns))}; hatched: not comparable with Table 6", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def save(rows: list[dict[str, Any]], out: str | Path, stem: str = "eval_all") -> list[Path]:
    """``stem``.md, .json, .csv and .png in ``out``; returns their paths."""
    out = Path(out)
    paths = [out / f"{stem}.{ext}" for ext in ("md", "json", "csv", "png")]
    atomic_write_text(paths[0], markdown(rows) + "\n")
    atomic_write_text(paths[1], to_json(rows))
    atomic_write_text(paths[2], to_csv(rows))
    plot(rows, paths[3])
    return paths
