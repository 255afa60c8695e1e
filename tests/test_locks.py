"""lra_soft.locks against real processes: a held lock refuses (or makes wait) another process, and the lock of a
process killed with SIGKILL is free at once."""
import signal
import subprocess
import sys
import threading
import time

import pytest

from lra_soft.locks import Busy, hold

# Holds the lock at argv[1] as hold() does (filelock; lra_soft itself would import torch, seconds), until its stdin
# closes or it is killed; says "held" once it has it.
HOLDER = ("import sys; from filelock import FileLock\n"
          "with FileLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()")


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_held_lock_refuses_another_process_and_sigkill_frees_it(tmp_path):
    path = tmp_path / "run" / ".lock"
    proc = _holder(path)
    try:
        with pytest.raises(Busy, match=r"^run directory r is in use by another process \(it holds the lock .*"
                                       r"\.lock\); pass another --out$"):
            with hold(path, "run directory r", wait=False, hint="pass another --out"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with hold(path, "run directory r", wait=False) as held:  # the kernel released the dead process's lock
        assert held == path
        with pytest.raises(Busy):  # not re-entrant: a second hold is another holder
            with hold(path, "run directory r", wait=False):
                pass
    assert path.exists()  # the file stays; only the lock on it went


def test_waiting_is_told_once_then_goes_on_when_the_holder_ends(tmp_path):
    path = tmp_path / ".cache.lock"
    proc = _holder(path)
    told = []
    with pytest.raises(Busy, match=r"in use by another process .*, still after 0\.2 s$"):
        with hold(path, "the cache c", wait=True, timeout=0.2):
            pass
    threading.Timer(0.3, proc.stdin.close).start()  # the holder finishes its work a moment later
    start = time.perf_counter()
    with hold(path, "the cache c", wait=True, on_wait=told.append):
        waited = time.perf_counter() - start
    proc.wait()
    assert told == [f"waiting for another process that holds the cache c (lock {path})"]
    assert waited >= 0.25 and proc.returncode == 0


def test_a_lock_that_cannot_be_taken_is_one_line(tmp_path, monkeypatch):
    """Another user's lock file or a read-only filesystem: Unlockable (a Busy, which the CLI prints as one line),
    naming the lock file and the reason; and through `prepare`, exit 1 with that line and no cache."""
    from filelock import FileLock
    from typer.testing import CliRunner

    from cli import app
    from lra_soft.locks import Unlockable

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(FileLock, "acquire", refuse)
    reason = r"cannot lock the cache x: Permission denied for the lock file .*\.lock \(a .*\); do this"
    with pytest.raises(Unlockable, match=reason):
        with hold(tmp_path / ".lock", "the cache x", wait=True, hint="do this"):
            pass
    out = CliRunner().invoke(app, ["prepare", "listops", "--source", "data/fixtures/listops", "--data-dir",
                                   str(tmp_path / "cache")])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot lock the cache ") and "Permission denied" in lines[0]
    assert not (tmp_path / "cache" / "listops").exists()
