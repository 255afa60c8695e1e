"""Cross-process locks: one process at a time trains into a run directory or builds a cache.

    with hold(run_dir / LOCK, f"run directory {run_dir}", wait=False, hint="pass another --out"):
        ...                                    # Busy at once when another process holds it
    with hold(cache.parent / f".{cache.name}.lock", f"the cache {cache}", wait=True, on_wait=print):
        ...                                    # waits for the holder (on_wait is told once), then goes on

A lock is an OS-level lock (``flock``) on a small file, taken through ``filelock``: the kernel releases it when the
holding process ends in any way, SIGKILL and crashes included, so a lock left by a dead process never blocks anyone.
The lock file itself stays (empty and harmless; deleting it while others wait on it would let two processes in). On
a filesystem without ``flock`` (some network filesystems) filelock falls back to its own lock file protocol.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

LOCK = ".lock"  # the lock file of a run directory, inside it


class Busy(RuntimeError):
    """Another process holds the lock; the message names what is locked, the lock file and what to do."""


class Unlockable(Busy):
    """The lock file cannot be created or opened (another user's directory or file, a read-only filesystem)."""


def _unlockable(path: Path, what: str, e: OSError, hint: str) -> Unlockable:
    why = e.strerror or type(e).__name__
    return Unlockable(f"cannot lock {what}: {why} for the lock file {path} (a directory or file of another user, or "
                      f"a read-only filesystem?)" + (f"; {hint}" if hint else ""))


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, wait: bool = False, *, hint: str = "",
         on_wait: Callable[[str], object] | None = None, timeout: float | None = None) -> Iterator[Path]:
    """Hold the lock file ``path`` (its directory is created) for the block; ``what`` names the locked thing.

    ``wait=False``: raise :class:`Busy` at once if another process holds it (``hint`` says what to do).
    ``wait=True``: wait for it, telling ``on_wait`` once (a line naming ``what``) if it is not free at once; with
    ``timeout`` (seconds) a wait that long ends in :class:`Busy`. Not re-entrant: a second ``hold`` of the same
    path, even in this process, is another holder."""
    path = Path(path)
    lock = FileLock(path)
    busy = f"{what} is in use by another process (it holds the lock {path})"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(blocking=False)
    except Timeout:  # filelock's Timeout is an OSError too: caught first
        if not wait:
            raise Busy(busy + (f"; {hint}" if hint else "")) from None
        if on_wait is not None:
            on_wait(f"waiting for another process that holds {what} (lock {path})")
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise Busy(f"{busy}, still after {timeout:g} s" + (f"; {hint}" if hint else "")) from None
    except OSError as e:
        raise _unlockable(path, what, e, hint) from None
    try:
        yield path
    finally:
        lock.release()
