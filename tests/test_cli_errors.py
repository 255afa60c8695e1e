"""A user's mistake on the command line fails before any data is touched: one line naming the flag and the value,
exit code 1, no traceback (LRA_SOFT_DEBUG=1 adds it). Also the task defaults in `train --help`, the options and costs
of `attentions`, and the hint for a data option given as an attention option. No case trains or prepares data."""
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lra_soft import protocol as P
from lra_soft.attention import ATTENTION, COST, attention_options
from tasks import TASKS

runner = CliRunner()


def _bad(tmp_path):
    path = tmp_path / "not_a_checkpoint.pt"
    path.write_text("not a checkpoint\n")  # torch.load says: weights_only=False would likely succeed
    return str(path)


CASES = [  # (command, words the one line must hold)
    (["train", "listops", "--attn", "sotf"], ["--attn sotf: unknown attention; choose from softmax, soft,"]),
    (["train", "nosuch"], ["TASK nosuch: unknown task; choose from listops,"]),
    (["train", "listops", "-o", "foo=1"], ["--option foo=1: unknown option of attention soft", "window=4"]),
    (["train", "listops", "--attn", "nystrom", "-o", "num_landmarks=0"], ["--option num_landmarks=0:"]),
    (["train", "listops", "--steps", "0"], ["--steps 0: must be >= 1"]),
    (["train", "listops", "--batch-size", "0"], ["--batch-size 0: must be >= 1"]),
    (["train", "listops", "--eval-every", "0"], ["--eval-every 0: must be >= 1"]),
    (["train", "listops", "--lr", "-1"], ["--lr -1.0: must be > 0"]),
    (["train", "listops", "--lr", "0"], ["--lr 0.0: must be > 0"]),
    (["train", "listops", "--warmup", "-1"], ["--warmup -1: must be >= 0"]),
    (["train", "listops", "--dropout", "1"], ["--dropout 1.0: must be in [0, 1)"]),
    (["train", "listops", "--dropout", "-0.1"], ["--dropout -0.1: must be in [0, 1)"]),
    (["train", "listops", "--eval-batches", "-1"], ["--eval-batches -1: must be >= 0"]),
    (["train", "listops", "--pad-to", "-1"], ["--pad-to -1: must be >= 0"]),
    (["train", "listops", "--max-len", "-1"], ["--max-len -1: must be >= 0"]),
    (["train", "listops", "--data-option", "foo=1"], ["--data-option foo=1:", "unknown option(s) ['foo']"]),
    (["train", "image", "--source", "no/such/dir"], ["--source no/such/dir: does not exist;", "cifar-10-batches-py"]),
    (["eval", "listops", "--checkpoint", "x.pt", "--batch-size", "0"], ["--batch-size 0: must be >= 1"]),
    (["eval", "listops", "--checkpoint", "missing.pt"], ["checkpoint missing.pt does not exist"]),
    (["prepare", "listops", "--data-option", "foo=1"], ["--data-option foo=1:", "unknown option(s) ['foo']"]),
    (["prepare", "text", "--data-option", "max_length=big"], ["--data-option max_length=big:", "type int"]),
    (["train", "listops", "--data-option", "generator=3"], ["--data-option generator=3:", "must be one of [1, 2]"]),
    (["prepare", "listops", "--data-option", "min_length=900", "--data-option", "max_length=800"],
     ["--data-option min_length=900 max_length=800:", "need 0 <= min_length < max_length - 1"]),
    (["prepare", "nosuch"], ["TASK nosuch: unknown task"]),
]


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_value_is_one_line_before_any_data(args, words, tmp_path):
    cache = tmp_path / "cache"
    out = runner.invoke(app, [*args, "--data-dir", str(cache), "--device", "cpu"] if args[0] != "prepare" else
                        [*args, "--data-dir", str(cache)])
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in out.output and not cache.exists()


OTHER = [  # commands without a cache: the same one-line rule
    (["bench", "--batch", "0"], "--batch 0: must be >= 1"),
    (["bench", "--repeats", "0"], "--repeats 0: must be >= 1"),
    (["bench", "--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["bench", "--attn", "sotf"], "unknown attention 'sotf' in --attn 'sotf'"),
    (["imagenet", "summary", "--model", "soft_nano"], "--model soft_nano: unknown backbone; choose from soft_tiny"),
    (["imagenet", "summary", "--img-size", "16"], "--img-size 16: must be >= 32"),
    (["imagenet", "train", "--data", "d", "--epochs", "0"], "--epochs 0: must be >= 1"),
    (["imagenet", "train", "--data", "d", "--lr", "-1"], "--lr -1.0: must be > 0"),
    (["imagenet", "train", "--data", "d", "--drop-path", "1.5"], "--drop-path 1.5: must be in [0, 1)"),
    (["imagenet", "train", "--data", "d", "-o", "foo=1"], "--option foo=1: unknown VisionConfig field(s) ['foo']"),
    (["imagenet", "train", "--data", "d", "--img-size", "16"], "--img-size 16: img_size 16 is below the smallest"),
    (["imagenet", "eval", "x.pt", "--data", "d", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["eval-all", "--runs", "no/such/runs"], "runs directory no/such/runs does not exist"),
]


@pytest.mark.parametrize("args, words", OTHER, ids=[" ".join(c[0]) for c in OTHER])
def test_every_command_reports_one_line(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = runner.invoke(app, args)
    lines = out.output.strip().splitlines()
    assert out.exit_code == 1 and len(lines) == 1 and words in lines[0], out.output
    assert list(tmp_path.iterdir()) == []  # nothing written: no runs/bench, no cache


def test_a_file_that_is_not_a_checkpoint_gives_no_torch_advice(tmp_path):
    bad = _bad(tmp_path)
    for args in (["eval", "listops", "--checkpoint", bad, "--data-dir", str(tmp_path / "cache")],
                 ["imagenet", "eval", bad, "--data", str(tmp_path)]):
        out = runner.invoke(app, [*args, "--device", "cpu"])
        lines = out.output.strip().splitlines()
        assert out.exit_code == 1 and len(lines) == 1 and f"checkpoint {bad} is not a checkpoint of lra-soft" in lines[0]
        assert "weights_only" not in out.output
    assert not (tmp_path / "cache").exists()


def test_cuda_on_a_machine_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cache = tmp_path / "cache"
    for args in (["train", "listops", "--data-dir", str(cache)], ["eval", "listops", "--checkpoint", "x.pt",
                                                                  "--data-dir", str(cache)],
                 ["bench", "--out", str(tmp_path / "b")], ["imagenet", "train", "--data", str(tmp_path)]):
        out = runner.invoke(app, [*args, "--device", "cuda"])
        lines = out.output.strip().splitlines()
        assert out.exit_code == 1 and len(lines) == 1, out.output
        assert lines[0].startswith("error: --device cuda asks for CUDA, but torch sees no CUDA device")
    assert not cache.exists() and not (tmp_path / "b").exists()


def test_an_attention_option_that_is_a_data_option_points_to_data_option(tmp_path):
    out = runner.invoke(app, ["train", "listops", "-o", "max_length=1000", "--data-dir", str(tmp_path / "c")])
    assert out.exit_code == 1 and out.output.strip().endswith("did you mean --data-option max_length=1000?")
    out = runner.invoke(app, ["train", "image", "--attn", "softmax", "-o", "pixel_offset=0",
                              "--data-dir", str(tmp_path / "c")])
    assert out.exit_code == 1 and "did you mean --data-option pixel_offset=0?" in out.output
    out = runner.invoke(app, ["train", "listops", "-o", "windw=4", "--data-dir", str(tmp_path / "c")])
    assert out.exit_code == 1 and "did you mean" not in out.output
    assert not (tmp_path / "c").exists()


def test_prepare_takes_data_option_not_o(tmp_path):
    out = runner.invoke(app, ["prepare", "listops", "-o", "seed=1", "--data-dir", str(tmp_path / "c")])
    assert out.exit_code == 2 and "No such option: -o" in out.output
    assert not (tmp_path / "c").exists()


def test_debug_shows_the_traceback(tmp_path):
    out = runner.invoke(app, ["train", "listops", "--steps", "0", "--data-dir", str(tmp_path / "c")],
                        env={"LRA_SOFT_DEBUG": "1"})
    assert out.exit_code == 1 and "File " in out.output and out.output.strip().endswith("error: --steps 0: must be >= 1")


def test_train_help_shows_each_tasks_defaults():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    rows = {line.split()[0]: line.split() for line in out.output.splitlines() if line.split()[:1] and
            line.split()[0] in TASKS}
    assert set(rows) == set(TASKS)
    for name, module in TASKS.items():
        t = module.TRAIN
        pad = [str(P.apply(P.PROTOCOLS[p][name], module.MODEL, t)[1].pad_to) for p in ("paper", "clean")]
        assert rows[name][1:] == [str(v) for v in (t.steps, t.batch_size, t.lr, t.warmup, t.eval_every,
                                                    module.MODEL.max_len, pad[0], "/", pad[1])], rows[name]


def test_attentions_lists_cost_and_options():
    assert set(COST) == set(ATTENTION)
    out = runner.invoke(app, ["attentions"])
    assert out.exit_code == 0
    text = out.output
    for name in ATTENTION:
        assert f"{name:<10} {COST[name]}" in text, name
        listed = ", ".join(f"{k}={v}" for k, v in attention_options(name).items()) or "none"
        assert f"options: {listed}" in text, name
    assert "O(n^2)" in text and "num_landmarks=64" in text
