"""CLI on the committed fixtures (Typer CliRunner, in process): train every task with softmax and soft, eval,
eval-all, tasks, NaN handling and the errors a user can act on."""
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lra_soft.train
from cli import app
from lra_soft.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # each task's cache is built once, on its first train


def _train(task, attn, out, data_dir, *extra):
    # The clean protocol pads each batch to its longest fixture sequence (fast); tests/test_protocol.py runs paper.
    protocol = [] if "--protocol" in extra else ["--protocol", "clean"]
    args = ["train", task, "--attn", attn, "--source", str(FIXTURES / task), "--data-dir", str(data_dir),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--device", "cpu",
            "--no-progress", *protocol, *extra]
    return runner.invoke(app, args)


@pytest.mark.slow  # ten trainings; test_eval_and_eval_all and test_user_errors train listops in the quick suite
@pytest.mark.parametrize("attn", ["softmax", "soft"])
@pytest.mark.parametrize("task", TASKS)
def test_train_every_task(task, attn, tmp_path, data_dir):
    # SOFT in the paper setting (avg-pool window 4, m = n/4, 20 Newton iterations) on the short fixture sequences of
    # listops/text/retrieval; image and pathfinder are always 1,024 pixels (m = 256), where 16 landmarks keep CI fast.
    extra = ["--option", "num_landmarks=16"] if attn == "soft" and task in ("image", "pathfinder") else []
    result = _train(task, attn, tmp_path / "run", data_dir, *extra)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "learning_curve.png"):
        assert (run / name).is_file(), name
    res = json.loads((run / "results.json").read_text())
    test_count = json.loads((Path(data_dir) / task / "manifest.json").read_text())["counts"]["test"]
    assert res["test_examples"] == test_count  # the whole test split, no dropped batch
    assert res["steps"] == 2 and res["tokens_per_s"] > 0
    correct = res["test_acc"] * test_count  # correct / count over the split, so a whole number of examples
    assert correct == pytest.approx(round(correct), abs=1e-6), res["test_acc"]
    # The reported test figures are those of best.pt on the whole test split: `eval` recomputes them, in batches
    # of 3 (the last one short, other padding) where training evaluated in batches of 4.
    out = runner.invoke(app, ["eval", task, "--checkpoint", str(run / "best.pt"), "--source", str(FIXTURES / task),
                              "--data-dir", str(data_dir), "--batch-size", "3", "--device", "cpu", "--no-progress"])
    assert out.exit_code == 0, out.output + repr(out.exception)
    acc, count, loss = re.search(r"accuracy ([\d.]+)% on (\d+) examples \(loss ([\d.]+)\)", out.output).groups()
    assert (acc, int(count)) == (f"{100 * res['test_acc']:.2f}", test_count)
    assert float(loss) == pytest.approx(res["test_loss"], abs=1e-4)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["attention"] == attn and config["vocab"] and config["versions"]["torch"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    assert {"loss", "lr", "tokens_per_s", "val_acc"} <= set(rows[0])
    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_eval_and_eval_all(tmp_path, data_dir):
    runs = tmp_path / "runs"
    for attn in ("softmax", "soft"):
        assert _train("listops", attn, runs / attn, data_dir).exit_code == 0
    res = json.loads((runs / "soft" / "results.json").read_text())

    out = runner.invoke(app, ["eval", "listops", "--checkpoint", str(runs / "soft" / "best.pt"), "--source",
                              str(FIXTURES / "listops"), "--data-dir", str(data_dir), "--device", "cpu",
                              "--no-progress"])
    assert out.exit_code == 0, out.output
    assert f"accuracy {100 * res['test_acc']:.2f}% on {res['test_examples']} examples" in out.output

    out = runner.invoke(app, ["eval", "text", "--checkpoint", str(runs / "soft" / "best.pt"), "--no-progress"])
    assert out.exit_code == 1 and "trained on 'listops'" in out.output

    out = runner.invoke(app, ["eval-all", "--runs", str(runs)])
    assert out.exit_code == 0, out.output
    # Two-step fixture runs: listed with their differences, never beside a paper figure.
    assert "No run is in the paper's setting" in out.output and "37.40" not in out.output
    assert "train examples 24 != 96000" in out.output and "protocol clean != paper" in out.output
    table = json.loads((runs / "eval_all.json").read_text())
    soft = next(r for r in table["rows"] if r["attention"] == "soft")
    assert soft["mean"] == pytest.approx(100 * res["test_acc"]) and soft["n"] == 1 and soft["std"] is None
    assert soft["paper"] is None and soft["diff"] is None and not soft["comparable"]
    assert (runs / "eval_all.csv").read_text().startswith("comparable,task,attention,options,protocol,steps")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real = lra_soft.train._loss

    def loss_going_nan(logits, labels):
        loss = real(logits, labels)
        if torch.is_grad_enabled():  # training steps only; evaluation runs under no_grad
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(lra_soft.train, "_loss", loss_going_nan)
    result = _train("listops", "softmax", tmp_path / "run", data_dir, "--steps", "5", "--eval-every", "1")
    assert result.exit_code == 1
    assert "loss is nan at step 3" in result.output and "step 2" in result.output
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "results.json").exists()


def test_user_errors(tmp_path, data_dir):
    first = _train("listops", "softmax", tmp_path / "run", data_dir)
    assert first.exit_code == 0
    again = _train("listops", "softmax", tmp_path / "run", data_dir)
    assert again.exit_code == 1 and "--resume" in again.output
    bad = _train("listops", "softmax", tmp_path / "b", data_dir, "--option", "num_landmarks=4")
    assert bad.exit_code == 1 and "unknown option" in bad.output
    missing = _train("listops", "softmax", tmp_path / "c", data_dir, "--resume")
    assert missing.exit_code == 1 and "nothing to resume" in missing.output
    other = _train("listops", "softmax", tmp_path / "run", data_dir, "--resume", "--lr", "0.5")
    assert other.exit_code == 1 and "another configuration" in other.output
    assert runner.invoke(app, ["train", "nosuchtask"]).exit_code == 1


def test_tasks_and_attentions_list():
    out = runner.invoke(app, ["tasks"])
    assert out.exit_code == 0 and [line.split()[0] for line in out.output.splitlines()] == list(TASKS)
    out = runner.invoke(app, ["attentions"])
    assert out.exit_code == 0 and "soft" in out.output.split()


def test_resume_refuses_a_cache_rebuilt_since_the_run_began(tmp_path):
    """The run's last.pt records its data build; after the cache is rebuilt from another source, --resume stops with
    one line instead of continuing on other examples."""
    from tasks.fixtures import listops_tsv

    data_dir, other = tmp_path / "cache", listops_tsv(tmp_path / "other", sizes=(30, 6, 6))
    assert _train("listops", "softmax", tmp_path / "run", data_dir).exit_code == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["data_sha256"]
    args = ["train", "listops", "--attn", "softmax", "--source", str(other), "--data-dir", str(data_dir), "--out",
            str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--device", "cpu",
            "--no-progress", "--protocol", "clean", "--resume"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "trained on another build of the data" in errors[0], out.output
    assert "Traceback" not in out.output


def test_prepare_says_what_the_cache_takes_on_disk(tmp_path):
    from tasks._common import disk_bytes

    out = runner.invoke(app, ["prepare", "listops", "--data-option", "num_train=40", "--data-option", "min_length=10",
                              "--data-option", "max_length=60", "--data-dir", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    size, raw = disk_bytes(tmp_path / "listops"), disk_bytes(tmp_path / "listops" / "raw")
    assert 0 < raw < size
    line = out.output.splitlines()[-1]
    assert line == (f"on disk: {size / 1024:.0f} KiB, of which {raw / 1024:.0f} KiB are the raw files in "
                    f"{tmp_path / 'listops' / 'raw'}, which the prepared cache no longer needs"), line
