"""Concurrent prepares of one cache, as real `python cli.py prepare` processes: the cache is built once, the others
wait for it and reuse it, and the lock of a SIGKILLed builder blocks nobody."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tasks
from tasks._common import cache_lock, read_manifest
from tasks.fixtures import listops_tsv

REPO = Path(__file__).resolve().parents[1]

# `python cli.py ...` with the ListOps tokenizer wrapped: each build appends its pid to $BUILD_LOG and, with
# $BUILD_GATE, waits (at most a minute) until that file exists, so a test can hold a builder inside its build.
CLI = r"""
import os, sys, time
from pathlib import Path
from tasks import listops
real = listops._tokenize_files
def counted(*args, **kwargs):
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    gate, deadline = os.environ.get("BUILD_GATE"), time.monotonic() + 60
    while gate and not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
listops._tokenize_files = counted
from cli import app
sys.argv = ["cli.py", *sys.argv[1:]]
app()
"""


class Prepare:
    """One `cli.py prepare listops` subprocess; its stderr is collected line by line as it comes."""

    def __init__(self, src: Path, data: Path, log: Path, gate: Path | None = None):
        env = {**os.environ, "BUILD_LOG": str(log), "PYTHONPATH": str(REPO)}
        if gate is not None:
            env["BUILD_GATE"] = str(gate)
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, "prepare", "listops", "--source", str(src),
                                      "--data-dir", str(data), "--no-progress"], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.err):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no {text!r}; stderr: {self.err}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        out = self.proc.stdout.read() if self.proc.wait(timeout) is not None else ""
        self.reader.join(10)
        return self.proc.returncode, out


def _wait_until(test, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _contents(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    return listops_tsv(tmp_path / "src")


@pytest.mark.slow
def test_second_prepare_waits_for_the_first_and_reuses_its_cache(tmp_path, src):
    """B starts while A is inside its build: B says it waits, A builds once, B reuses; the cache is the one a
    prepare alone builds, byte for byte."""
    log, gate, data = tmp_path / "builds.log", tmp_path / "gate", tmp_path / "data"
    a = Prepare(src, data, log, gate)
    _wait_until(lambda: log.exists() and log.read_text().strip())  # A holds the lock, inside the build
    b = Prepare(src, data, log, gate)
    b.wait_for(f"waiting for another process that holds the cache {data / 'listops'}")
    gate.touch()
    (rc_a, out_a), (rc_b, out_b) = a.finish(), b.finish()
    assert (rc_a, rc_b) == (0, 0), (a.err, b.err)
    assert log.read_text().split() == [str(a.proc.pid)]  # built once, by A
    assert out_a == out_b and "counts {'train': 24, 'val': 8, 'test': 8}" in out_a
    alone = tasks.prepare("listops", src, tmp_path / "alone", progress=False)
    assert _contents(data / "listops") == _contents(alone)
    assert sorted(p.name for p in data.iterdir()) == [".listops.lock", "listops"]


@pytest.mark.slow
def test_prepares_started_together_build_once(tmp_path, src):
    """Three started at once: each ends up building or waiting, and only one builds (held in its build until the
    other two have said they wait)."""
    log, gate, data = tmp_path / "builds.log", tmp_path / "gate", tmp_path / "data"
    runs = [Prepare(src, data, log, gate) for _ in range(3)]

    def settled() -> bool:
        building = log.read_text().split() if log.exists() else []
        waiting = [run for run in runs if any("waiting for another process" in line for line in run.err)]
        assert len(building) <= 1, f"{len(building)} processes build the cache at once"
        return len(building) + len(waiting) == 3

    _wait_until(settled)
    gate.touch()
    results = [run.finish() for run in runs]
    assert [rc for rc, _ in results] == [0, 0, 0], [run.err for run in runs]
    assert len(log.read_text().split()) == 1 and len({out for _, out in results}) == 1
    assert read_manifest(data / "listops")["counts"] == {"train": 24, "val": 8, "test": 8}


@pytest.mark.slow
def test_lock_of_a_killed_builder_does_not_block(tmp_path, src):
    """A builder SIGKILLed inside its build leaves its lock file and a partial build; the next prepare takes the lock
    at once, removes the partial build and builds the cache."""
    log, data = tmp_path / "builds.log", tmp_path / "data"
    a = Prepare(src, data, log, gate=tmp_path / "never")
    _wait_until(lambda: log.exists() and log.read_text().strip())
    os.kill(a.proc.pid, signal.SIGKILL)
    assert a.finish()[0] == -signal.SIGKILL
    assert (data / ".listops.lock").exists() and list(data.glob(".listops.building-*"))  # what the kill left
    start = time.monotonic()
    b = Prepare(src, data, log)
    rc, out = b.finish(timeout=120)
    assert rc == 0 and "counts" in out, b.err
    assert not any("waiting" in line for line in b.err) and time.monotonic() - start < 120
    assert sorted(p.name for p in data.iterdir()) == [".listops.lock", "listops"]  # the partial build is gone
    assert len(log.read_text().split()) == 2


def test_cache_lock_without_a_writable_folder_takes_no_lock(tmp_path):
    """Loading from a folder that does not exist creates nothing (a read-only cache is read without a lock)."""
    with cache_lock(tmp_path / "none" / "listops"):
        pass
    assert not (tmp_path / "none").exists()
    with pytest.raises(FileNotFoundError, match="no prepared listops cache"):
        tasks.load("listops", tmp_path / "none" / "listops", "train")
    assert not (tmp_path / "none").exists()


def test_training_opens_one_build_even_if_the_cache_is_rebuilt_meanwhile(tmp_path, monkeypatch):
    """Another job rebuilding the cache (other sources or options) between train's prepare and its opening of the
    splits: train opens the splits again, and all three then come from the build of its own source."""
    import cli

    ours, theirs = REPO / "data" / "fixtures" / "listops", listops_tsv(tmp_path / "theirs", sizes=(30, 6, 6))
    data_dir = tmp_path / "cache"
    cache = tasks.prepare("listops", ours, data_dir, progress=False)
    expected = read_manifest(cache)["arrays"]
    real_load, rebuilt = tasks.load, []

    def load(name, path, split):
        if split == "val" and not rebuilt:  # the other job, half way through our opening of the splits
            rebuilt.append(tasks.prepare("listops", theirs, data_dir, progress=False))
        return real_load(name, path, split)

    monkeypatch.setattr(tasks, "load", load)
    manifest, splits = cli._open_splits("listops", ours, data_dir, {}, cache)
    assert rebuilt and manifest["arrays"] == expected
    assert all(ds.records == expected for ds in splits.values())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [len(real_load("listops", cache, s)) for s in
                                                                   ("train", "val", "test")]


def test_a_cache_rebuilt_on_every_try_is_one_line(tmp_path, monkeypatch):
    import cli

    ours, theirs = REPO / "data" / "fixtures" / "listops", listops_tsv(tmp_path / "theirs", sizes=(30, 6, 6))
    data_dir = tmp_path / "cache"
    cache = tasks.prepare("listops", ours, data_dir, progress=False)
    real_load = tasks.load

    def load(name, path, split):
        if split == "val":  # another job, with another source, rebuilds it during each of our tries
            tasks.prepare("listops", theirs, data_dir, progress=False)
        return real_load(name, path, split)

    monkeypatch.setattr(tasks, "load", load)
    with pytest.raises(tasks.DataError, match="rebuilt 3 times while this job opened it.*its own --data-dir"):
        cli._open_splits("listops", ours, data_dir, {}, cache)
