"""eval-all's table: averaging of seeds, the paper's Table 6 figures, differences and the four-task average."""
import json

import pytest
import torch
from typer.testing import CliRunner

from cli import _parse_options, app
from lra_soft import results as R


def _run(root, name, task, attention, acc):
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"task": task, "attention": attention, "test_acc": acc}))


def test_table6_figures_average_and_diff(tmp_path):
    accs = {"listops": 0.38, "text": 0.64, "retrieval": 0.80, "image": 0.45}
    for task, acc in accs.items():
        _run(tmp_path, f"{task}-soft", task, "soft", acc)
    _run(tmp_path, "listops-softmax-s0", "listops", "softmax", 0.30)
    _run(tmp_path, "listops-softmax-s1", "listops", "softmax", 0.40)
    (tmp_path / "m64").mkdir()
    (tmp_path / "m64" / "results.json").write_text(json.dumps({"task": "listops", "attention": "soft", "test_acc": 0.2,
                                                               "attention_options": {"num_landmarks": 64}}))
    rows = R.summarize(R.find_runs(tmp_path))
    softmax = next(r for r in rows if r["attention"] == "softmax")
    assert softmax["runs"] == 2 and softmax["test_acc"] == pytest.approx(35.0)
    assert softmax["paper"] == 37.10 and softmax["diff"] == pytest.approx(35.0 - 37.10)
    avg = R.averages(rows)
    assert avg["soft"]["test_acc"] == pytest.approx(100 * sum(accs.values()) / 4)
    assert avg["soft"]["diff"] == pytest.approx(100 * sum(accs.values()) / 4 - 57.39)
    assert avg["softmax"]["test_acc"] is None and avg["softmax"]["tasks"] == 1  # no average from one task
    for attention, figures in R.PAPER_TABLE6.items():  # the printed averages are the means of the printed figures
        assert sum(figures.values()) / 4 == pytest.approx(R.PAPER_AVERAGE[attention], abs=0.006)
    m64 = next(r for r in rows if r["attention"] == "soft (num_landmarks=64)")
    assert m64["runs"] == 1 and m64["paper"] == 37.40 and m64["diff"] == pytest.approx(20.0 - 37.40)
    table = R.markdown(rows)
    assert "| soft | 38.00 (paper 37.40, +0.60)" in table and "35.00 (paper 37.10, -2.10) n=2" in table
    assert R.to_csv(rows).splitlines()[0] == "attention,task,test_acc,runs,paper,diff"


def test_eval_all_errors(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["eval-all", "--runs", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "does not exist" in out.output
    out = runner.invoke(app, ["eval-all", "--runs", str(tmp_path)])
    assert out.exit_code == 1 and "no results.json" in out.output


def test_option_parsing():
    assert _parse_options(["num_landmarks=64", "inverse=exact", "ridge=1e-6", "fused=false", "x=None"], "-o") == {
        "num_landmarks": 64, "inverse": "exact", "ridge": 1e-6, "fused": False, "x": None}
    with pytest.raises(Exception, match="key=value"):
        _parse_options(["num_landmarks"], "-o")


@pytest.mark.gpu
def test_train_on_cuda_with_bf16(tmp_path):
    from pathlib import Path
    fixtures = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "listops"
    out = CliRunner().invoke(app, ["train", "listops", "--attn", "soft", "--source", str(fixtures), "--data-dir",
                                   str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--steps", "3",
                                   "--batch-size", "4", "--eval-every", "3", "--device", "cuda", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "run" / "results.json").read_text())["test_loss"]))
