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
