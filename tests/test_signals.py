"""Real processes, real signals: SIGINT or SIGTERM during `train` or `imagenet train` writes last.pt at the next step
boundary and exits 130 / 143 with the command that resumes; that command ends exactly like an uninterrupted run.
During `prepare` (and the preparation `train` starts) they leave no cache, complete or partial, behind."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks
from lra_soft.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures" / "listops"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow  # every test here runs commands in subprocesses

LISTOPS = ("train", "listops", "--source", str(FIXTURES), "--device", "cpu", "--no-progress", "--protocol", "clean",
           "--attn", "soft", "--steps", "60", "--batch-size", "4", "--eval-every", "3", "--seed", "3")
IMAGENET = ("imagenet", "train", "--img-size", "32", "--global-batch", "4", "--micro-batch", "2", "--epochs", "20",
            "--warmup-epochs", "1", "--workers", "0", "--device", "cpu", "--ema-decay", "0.5",
            "-o", "dims=(16,32,32,64)", "-o", "heads=(1,2,2,4)", "-o", "depths=(1,1,1,1)")


def _cli(*args):
    return [sys.executable, "cli.py", *map(str, args)]


def _default_sigint():
    # A test run started in the background of a non-interactive shell inherits SIGINT ignored, and so would the
    # command; it gets the default disposition, as from a terminal, so that the signal is what is tested.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(command, ready, signum, timeout=240):
    """Start ``command``, send it ``signum`` once ``ready()`` holds, return (exit code, stderr)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the command ended before the signal; the test proved nothing"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _has_lines(path):
    return lambda: path.exists() and path.read_text().count("\n") >= 1


def _resume_command(err):
    """The command of the one `interrupted:` line, as the user would paste it."""
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1, err
    head, command = lines[0].split("; to continue: ")
    words = shlex.split(command)
    assert words[:2] == ["python", "cli.py"] and words[-1] == "--resume"
    return head, [sys.executable, *words[1:]]


def _rows(run, timing=("tokens_per_s",)):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tasks.prepare("listops", FIXTURES, cache, progress=False)
    return cache


def test_sigint_during_train_keeps_last_pt_and_the_printed_resume_ends_like_an_uninterrupted_run(tmp_path, data_dir):
    full, run = tmp_path / "full", tmp_path / "run"
    subprocess.run(_cli(*LISTOPS, "--data-dir", data_dir, "--out", full), cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    code, err = _interrupt(_cli(*LISTOPS, "--data-dir", data_dir, "--out", run), _has_lines(run / "steps.jsonl"),
                           signal.SIGINT)
    assert code == 130, err
    head, resume = _resume_command(err)
    step = load_checkpoint(run / "last.pt")["step"]
    assert head == f"interrupted: stopped by SIGINT after step {step} of 60; {run / 'last.pt'} holds the run at that step"
    assert 3 <= step < 60 and not (run / "results.json").exists()
    assert "SIGINT: stopping after this step, which writes last.pt" in err and "Traceback" not in err

    done = subprocess.run(resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = json.loads((full / "results.json").read_text()), json.loads((run / "results.json").read_text())
    assert {k: v for k, v in a.items() if not k.endswith(("_s", "per_s"))} == \
        {k: v for k, v in b.items() if not k.endswith(("_s", "per_s"))}
    assert _rows(full) == _rows(run)
    assert (full / "steps.jsonl").read_text() == (run / "steps.jsonl").read_text()


def test_sigterm_during_imagenet_train_resumes_to_the_same_end(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            (folder / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / split / c / f"{i}.png")
    full, run = tmp_path / "full", tmp_path / "run"
    subprocess.run(_cli(*IMAGENET, "--data", folder, "--out", full), cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    code, err = _interrupt(_cli(*IMAGENET, "--data", folder, "--out", run), _has_lines(run / "metrics.jsonl"),
                           signal.SIGTERM)
    assert code == 143, err
    head, resume = _resume_command(err)
    assert head.startswith("interrupted: stopped by SIGTERM after step ") and resume[2:4] == ["imagenet", "train"]
    assert load_checkpoint(run / "last.pt")["step"] < 60 and not (run / "results.json").exists()

    done = subprocess.run(resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _rows(full, timing=()) == _rows(run, timing=())
    a, b = json.loads((full / "results.json").read_text()), json.loads((run / "results.json").read_text())
    assert {k: v for k, v in a.items() if not k.endswith("_s")} == {k: v for k, v in b.items() if not k.endswith("_s")}


def _generating(data_dir):
    """True once the generated TSV being written has rows: its worker processes are forked by then (a signal that
    lands inside a fork's hooks is swallowed by Python itself)."""
    return lambda: any(p.stat().st_size > 0 for p in data_dir.glob(".listops.building-*/**/.*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_prepare_leaves_no_cache(tmp_path, signum):
    data_dir = tmp_path / "cache"  # ListOps generated: 96,000 expressions, far from done when the signal comes
    code, err = _interrupt(_cli("prepare", "listops", "--data-dir", data_dir, "--no-progress"), _generating(data_dir),
                           signum)
    assert code == 128 + signum, err
    assert err.strip().splitlines()[-1] == (f"interrupted: stopped by {signal.Signals(signum).name}; nothing "
                                            "half-written is kept: run the command again"), err
    assert "Traceback" not in err
    assert [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] == []  # no cache, no temporary one


def test_sigterm_during_the_preparation_train_starts_leaves_no_cache_and_no_run(tmp_path):
    data_dir, run = tmp_path / "cache", tmp_path / "run"
    code, err = _interrupt(_cli("train", "listops", "--data-dir", data_dir, "--out", run, "--device", "cpu",
                                "--no-progress"), _generating(data_dir), signal.SIGTERM)
    assert code == 143 and "nothing half-written is kept" in err.splitlines()[-1], err
    assert [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert not run.exists()
