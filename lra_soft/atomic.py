"""Atomic file writes: a reader sees the old file or the complete new one, never a part, even after a SIGKILL.

    atomic_write_text(run_dir / "config.json", text)
    with atomic_open(cache / "train.csv", "w", encoding="ascii", newline="") as f: ...
    atomic_write(path, lambda tmp: torch.save(state, tmp))      # a writer that wants a file name

Every write goes to a temporary ``.NAME.XXXX.tmp`` beside the target (same filesystem, so the rename is atomic),
is flushed to disk with ``fsync``, then renamed over the target with ``os.replace``. On any exception (a
KeyboardInterrupt included) the temporary file is removed and the target is left as it was. The file gets the
permissions a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.

A write that runs out of space (ENOSPC, or EDQUOT over a quota) raises :class:`DiskFull`, an ``OSError`` whose one
line names the file, says that its previous version is intact and how much space the new one needs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    """``1.5 GB``: bytes in decimal units, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def no_space(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind ``error``, if any (torch.save reports a failed write as a RuntimeError
    raised while handling it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class DiskFull(OSError):
    """A write found no space left (ENOSPC / EDQUOT); the target was left as it was. ``str()`` is the one line.

    ``kept`` and ``need`` replace what the message says is kept and how much is needed (the defaults are those of
    an atomic replacement: the previous file, and its size)."""

    def __init__(self, path: Path, error: OSError, written: int = 0, *, kept: str = "", need: str = ""):
        previous = path.stat().st_size if path.is_file() else 0
        free = shutil.disk_usage(path.parent).free
        kept = kept or (f"the previous {path.name} ({human_bytes(previous)}) is intact" if previous else
                        f"{path.name} was not written")
        need = need or (f"the new one needs about {human_bytes(previous)} (the previous one's size)"
                        if previous >= written else
                        f"the new one needs more than the {human_bytes(written)} written before the disk filled")
        self.message = (f"{path}: {os.strerror(error.errno).lower()} while writing it; {kept}; {need}, "
                        f"{human_bytes(free)} is free on its filesystem: free space there, then try again")
        super().__init__(error.errno, self.message, str(path))
        self.path = path

    def __str__(self) -> str:
        return self.message


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` that replaces it, fsynced, if the block completes; removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)  # first: it holds the space the message counts as free
        if (full := no_space(e)) is not None:
            raise DiskFull(path, full, written) from e
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file under a temporary name, then move it over ``path`` in one step."""
    path = Path(path)
    with _temporary_beside(path) as tmp:
        write(tmp)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, except that ``path`` changes only when the block completes."""
    with _temporary_beside(Path(path)) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
