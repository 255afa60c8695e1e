"""Real processes: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one; two gloo processes
under torchrun give the same run as one process with the same global batch."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tasks
from lra_soft.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures" / "listops"
METRICS = ("test_acc", "test_examples", "test_loss", "best_val_acc", "best_step", "steps")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow  # every test here runs whole trainings in subprocesses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tasks.prepare("listops", FIXTURES, cache, progress=False)
    return cache


def _cmd(data_dir, out, *extra):
    return [sys.executable, "cli.py", "train", "listops", "--source", str(FIXTURES), "--data-dir", str(data_dir),
            "--out", str(out), "--device", "cpu", "--no-progress", "--protocol", "clean", *extra]


def _rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # timing differs, metrics must not


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, data_dir):
    # SOFT (paper setting) with dropout on, 60 steps over 10 epochs of the 24-example fixture, checkpoint every 4.
    args = ("--attn", "soft", "--steps", "60", "--batch-size", "4", "--eval-every", "4", "--seed", "3")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(data_dir, full, *args), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(data_dir, killed, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    time.sleep(0.05)  # somewhere between two checkpoints, whatever the process is doing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists(), "the run finished before the kill; the test proved nothing"
    assert load_checkpoint(killed / "last.pt")["step"] < 60

    resumed = subprocess.run(_cmd(data_dir, killed, *args, "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    assert _rows(full) == _rows(killed)
    assert not list(killed.glob(".*.tmp"))  # temp files of a write cut by the kill are swept on resume
    wa, wb = load_checkpoint(full / "best.pt")["model"], load_checkpoint(killed / "best.pt")["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_match_one_process(tmp_path, data_dir):
    # Dropout off: dropout masks are per-process random streams; everything else must agree.
    args = ("--attn", "softmax", "-o", "attn_dropout=0", "--steps", "6", "--batch-size", "8", "--eval-every", "3",
            "--dropout", "0",
            "--lr", "1e-3", "--warmup", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(data_dir, one, *args), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ddp = subprocess.run(launch + _cmd(data_dir, two, *args)[1:], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    for key in ("test_acc", "test_examples", "best_val_acc", "best_step", "steps"):
        assert a[key] == b[key], key
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    for ra, rb in zip(_rows(one), _rows(two)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4) and rb["val_acc"] == ra["val_acc"]
    wa, wb = load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    assert ddp.stdout.count("test accuracy") == 1  # rank 0 alone reports (and writes)
