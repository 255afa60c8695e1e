"""The eval-all table: every run's test accuracy beside the SOFT paper's Table 6 (Lu et al., NeurIPS 2021, Sec. 4.5).

Table 6 reports test accuracy (%) of the 2-layer LRA protocol of Nystromformer's PyTorch harness on four tasks
(Pathfinder omitted: "we cannot replicate the result of Nyströmformer"). A run directory is any directory holding
``results.json`` (and ``config.json``) written by ``lra_soft.train.fit``; several runs of one (task, attention), e.g.
seeds, are averaged and counted; runs with other attention options (``-o``) get their own row.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

TABLE6_TASKS = ("listops", "text", "retrieval", "image")
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


def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every results.json under ``root`` (recursively), with its run directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist; train first (`cli.py train ...`) or pass "
                                "--runs DIR")
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it or re-run `cli.py eval`") from e
        runs.append({**res, "run_dir": str(path.parent)})
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attention, task): mean test accuracy (%) over runs, run count, paper figure and difference."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        options = ",".join(f"{k}={v}" for k, v in sorted((r.get("attention_options") or {}).items()))
        label = f"{r['attention']} ({options})" if options else r["attention"]  # other options = another row
        groups.setdefault((label, r["task"], r["attention"]), []).append(100.0 * r["test_acc"])
    rows = []
    for (label, task, attention), accs in sorted(groups.items()):
        paper = PAPER_TABLE6.get(attention, {}).get(task)
        ours = sum(accs) / len(accs)
        rows.append({"attention": label, "task": task, "test_acc": ours, "runs": len(accs), "paper": paper,
                     "diff": None if paper is None else ours - paper})
    return rows


def averages(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per attention: the mean over Table 6's four tasks, only when all four have runs (else None, with the count)."""
    out = {}
    for attention in sorted({r["attention"] for r in rows}):
        accs = {r["task"]: r["test_acc"] for r in rows if r["attention"] == attention and r["task"] in TABLE6_TASKS}
        ours = sum(accs.values()) / 4 if len(accs) == 4 else None
        paper = PAPER_AVERAGE.get(attention.split(" (")[0])
        out[attention] = {"test_acc": ours, "tasks": len(accs), "paper": paper,
                          "diff": None if ours is None or paper is None else ours - paper}
    return out


def _fmt(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def markdown(rows: list[dict[str, Any]]) -> str:
    """Attention x task table: 'ours (paper, diff)' per cell and the Table 6 average."""
    tasks = [t for t in (*TABLE6_TASKS, "pathfinder") if any(r["task"] == t for r in rows)]
    tasks += sorted({r["task"] for r in rows} - set(tasks))
    avg = averages(rows)
    lines = ["| attention | " + " | ".join(tasks) + " | average (Table 6 tasks) |",
             "|---" * (len(tasks) + 2) + "|"]
    for attention in sorted(avg):
        cells = []
        for task in tasks:
            r = next((r for r in rows if r["attention"] == attention and r["task"] == task), None)
            cells.append("" if r is None else f"{_fmt(r['test_acc'])} (paper {_fmt(r['paper'])}, "
                                                 f"{_fmt(r['diff'], sign=True)})" + (f" n={r['runs']}" if r["runs"] > 1
                                                                                      else ""))
        a = avg[attention]
        cells.append(f"{_fmt(a['test_acc'])} (paper {_fmt(a['paper'])}, {_fmt(a['diff'], sign=True)})"
                     if a["test_acc"] is not None else f"– ({a['tasks']}/4 tasks run)")
        lines.append(f"| {attention} | " + " | ".join(cells) + " |")
    lines.append("\nTest accuracy (%) of the best-dev checkpoint on the full test split; paper = SOFT paper Table 6.")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["attention", "task", "test_acc", "runs", "paper", "diff"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    return json.dumps({"rows": rows, "averages": averages(rows), "runs": runs}, indent=1) + "\n"
