"""eval-all's table: averaging of seeds, the paper's Table 6 figures, differences and the four-task average."""
import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lra_soft import protocol as P
from lra_soft import results as R


def _run(root, name, task, attention, acc, seed=0, comparable=True, options=None, steps=5000):
    """A run directory as fit writes it (the fields eval-all reads)."""
    run = root / name
    run.mkdir(parents=True)
    differences = [] if comparable else ["steps 200 != 5000"]
    (run / "results.json").write_text(json.dumps({
        "task": task, "attention": attention, "attention_options": options or {}, "test_acc": acc, "seed": seed,
        "protocol": "paper", "precision": "fp32", "comparable": comparable, "differences": differences}))
    (run / "config.json").write_text(json.dumps({"model": {"dim": 64, "depth": 2}, "train": {
        "protocol": "paper", "steps": steps, "batch_size": 32, "lr": 1e-4, "seed": seed},
        "data": {"counts": {"train": 96000, "val": 2000, "test": 2000}}}))


def test_table6_figures_average_and_diff(tmp_path):
    accs = {"listops": 0.38, "text": 0.64, "retrieval": 0.80, "image": 0.45}
    for task, acc in accs.items():
        _run(tmp_path, f"{task}-soft", task, "soft", acc)
    _run(tmp_path, "listops-softmax-s0", "listops", "softmax", 0.30, seed=0)
    _run(tmp_path, "listops-softmax-s1", "listops", "softmax", 0.40, seed=1)
    _run(tmp_path, "m64", "listops", "soft", 0.2, comparable=False, options={"num_landmarks": 64})
    rows = R.summarize(R.find_runs(tmp_path))
    softmax = next(r for r in rows if r["attention"] == "softmax")
    assert softmax["n"] == 2 and softmax["seeds"] == [0, 1] and softmax["mean"] == pytest.approx(35.0)
    assert softmax["std"] == pytest.approx(7.0710678)  # sample standard deviation of 30 and 40
    assert softmax["paper"] == 37.10 and softmax["diff"] == pytest.approx(35.0 - 37.10)
    avg = R.averages(rows)
    assert avg["soft"]["mean"] == pytest.approx(100 * sum(accs.values()) / 4)
    assert avg["soft"]["diff"] == pytest.approx(100 * sum(accs.values()) / 4 - 57.39)
    assert avg["softmax"]["mean"] is None and avg["softmax"]["tasks"] == 1  # no average from one task
    assert set(R.PAPER_TABLE6) == set(P.TABLE6_ATTENTIONS)  # the comparability check knows the same attentions
    for attention, figures in R.PAPER_TABLE6.items():  # the printed averages are the means of the printed figures
        assert sum(figures.values()) / 4 == pytest.approx(R.PAPER_AVERAGE[attention], abs=0.006)
    m64 = next(r for r in rows if r["options"] == "num_landmarks=64")
    assert not m64["comparable"] and m64["paper"] is None and m64["diff"] is None
    assert m64["differences"] == ["steps 200 != 5000"]
    table = R.markdown(rows)
    comparable, other = table.split("## Not comparable")
    assert "| listops | soft | 38.00 ± – (n=1) | 37.40 | +0.60 |" in comparable
    assert "| listops | softmax | 35.00 ± 7.07 (n=2) | 37.10 | -2.10 | listops-softmax-s0, listops-softmax-s1 |" \
        in comparable  # the runs behind a figure are named
    assert "| soft | 56.75 | 57.39 | -0.64 |" in comparable
    assert "20.00" not in comparable and "| num_landmarks=64 | paper | 5000 | 20.00 ± – (n=1) | steps 200" in other
    assert other.count("| m64 |") == 1
    assert R.to_csv(rows).splitlines()[0] == ",".join(R.CSV_FIELDS)


def test_other_steps_or_options_never_share_a_row(tmp_path):
    _run(tmp_path, "a", "listops", "soft", 0.3, steps=5000)
    _run(tmp_path, "b", "listops", "soft", 0.3, steps=4000, comparable=False)
    _run(tmp_path, "c", "listops", "soft", 0.3, options={"window": 8}, comparable=False)
    rows = R.summarize(R.find_runs(tmp_path))
    assert len(rows) == 3 and all(r["n"] == 1 for r in rows)
    assert [r["comparable"] for r in rows] == [True, False, False]


def test_eval_all_errors(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["eval-all", "--runs", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "does not exist" in out.output
    out = runner.invoke(app, ["eval-all", "--runs", str(tmp_path)])
    assert out.exit_code == 1 and "no results.json" in out.output


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])  # fp16 + GradScaler: the paper protocol's on CUDA
def test_train_on_cuda(tmp_path, precision):
    from pathlib import Path
    fixtures = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "listops"
    out = CliRunner().invoke(app, ["train", "listops", "--attn", "soft", "--source", str(fixtures), "--data-dir",
                                   str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--steps", "3",
                                   "--batch-size", "4", "--eval-every", "3", "--device", "cuda", "--no-progress",
                                   "--precision", precision])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"].startswith("cuda")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["precision"] == precision and torch.isfinite(torch.tensor(results["test_loss"]))


def test_experiment_key_uses_the_precision_that_ran():
    """On CPU every run is fp32: a run that asked for bf16 and one that asked for fp16 are one experiment."""
    from lra_soft.results import experiment
    base = {"results": {"task": "listops", "attention": "soft", "precision": "fp32"},
            "config": {"model": {"dim": 64}, "train": {"steps": 5000, "precision": "bf16"}, "data": {}}}
    other = {**base, "config": {**base["config"], "train": {"steps": 5000, "precision": "fp16"}}}
    assert experiment(base) == experiment(other)
    on_gpu = {**other, "results": {**base["results"], "precision": "fp16"}}
    assert experiment(on_gpu) != experiment(base)


def test_save_writes_the_table_and_its_plot(tmp_path):
    """md, json, csv and a png; the plot's bars are the rows (two experiments of one attention on one task apart)."""
    _run(tmp_path, "a0", "listops", "soft", 0.30, seed=0)
    _run(tmp_path, "a1", "listops", "soft", 0.40, seed=1)
    _run(tmp_path, "b", "listops", "soft", 0.2, steps=4000, comparable=False)
    _run(tmp_path, "c", "text", "softmax", 0.6)
    rows = R.summarize(R.find_runs(tmp_path))
    paths = R.save(rows, tmp_path / "out", stem="table")
    assert [p.name for p in paths] == ["table.md", "table.json", "table.csv", "table.png"]
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths[1].read_text())["rows"][0]["n"] == 2
    assert R._bar_labels(rows) == ["soft, paper, 5000 steps", "softmax", "soft, paper, 4000 steps"]
