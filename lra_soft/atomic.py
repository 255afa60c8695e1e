"""Atomic file writes: a reader sees the old file or the complete new one, never a part, even after a SIGKILL.

    atomic_write_text(run_dir / "config.json", text)
    with atomic_open(cache / "train.csv", "w", encoding="ascii", newline="") as f: ...
    atomic_write(path, lambda tmp: torch.save(state, tmp))      # a writer that wants a file name

Every write goes to a temporary ``.NAME.XXXX.tmp`` beside the target (same filesystem, so the rename is atomic),
is flushed to disk with ``fsync``, then renamed over the target with ``os.replace``. On any exception (a
KeyboardInterrupt included) the temporary file is removed and the target is left as it was. The file gets the
permissions a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
