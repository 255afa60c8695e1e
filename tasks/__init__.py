"""The five Long Range Arena tasks: one module each with ``NAME``, ``MODEL``, ``TRAIN``, ``prepare`` and ``load``.

Importing this package reads no data; ``prepare`` builds a task's cache under ``data_dir / name`` and ``load``
opens one split of it as a ``torch.utils.data.Dataset`` (see ``tasks/_common.py`` for the cache layout).
"""
from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch.utils.data import Dataset

from tasks import image, listops, pathfinder, retrieval, text
from tasks._common import DataError, collate

TaskName = Literal["listops", "text", "retrieval", "image", "pathfinder"]

TASKS: dict[str, ModuleType] = {
    "listops": listops,
    "text": text,
    "retrieval": retrieval,
    "image": image,
    "pathfinder": pathfinder,
}

__all__ = ["TASKS", "TaskName", "DataError", "collate", "get_task", "prepare", "load", "layouts", "parse_options"]


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
    return TASKS[name]


def prepare(name: str, source: Path | str | None = None, data_dir: Path = Path("data/cache"), *, progress: bool = True,
            **options: Any) -> Path:
    """Prepare (or reuse, if its manifest matches) the cache of task ``name`` under ``data_dir / name``."""
    return get_task(name).prepare(source, Path(data_dir) / name, progress=progress, **options)


def load(name: str, cache_path: Path, split: str) -> Dataset:
    """One split ("train", "val" or "test") of a prepared cache, e.g. ``load("listops", cache, "val")``."""
    return get_task(name).load(Path(cache_path), split)


def layouts() -> str:
    """The accepted source layouts of every task, for help texts and error messages."""
    return "\n".join(module.LAYOUTS for module in TASKS.values())


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["seed=1", "val=test", "decode=true"]`` -> ``{"seed": 1, "val": "test", "decode": True}``.

    Values are Python literals where they parse as one (ints, floats), ``true``/``false`` in any case are booleans,
    anything else is a string.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"option {pair!r} is not of the form key=value")
        if raw.lower() in ("true", "false"):
            out[key.strip()] = raw.lower() == "true"
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value if isinstance(value, (int, float, str)) else raw
    return out
