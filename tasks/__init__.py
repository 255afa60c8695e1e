"""The five Long Range Arena tasks: one module each with ``NAME``, ``MODEL``, ``TRAIN``, ``prepare`` and ``load``.

Importing this package reads no data; ``prepare`` builds a task's cache under ``data_dir / name`` and ``load``
opens one split of it as a ``torch.utils.data.Dataset`` (see ``tasks/_common.py`` for the cache layout).
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch.utils.data import Dataset

from tasks import image, listops, pathfinder, retrieval, text
from tasks._common import DataError, check_options, collate, read_manifest

TaskName = Literal["listops", "text", "retrieval", "image", "pathfinder"]

TASKS: dict[str, ModuleType] = {
    "listops": listops,
    "text": text,
    "retrieval": retrieval,
    "image": image,
    "pathfinder": pathfinder,
}

__all__ = ["TASKS", "TaskName", "DataError", "collate", "get_task", "data_options", "check_data_options", "prepare",
           "load", "manifest", "layouts"]


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
    return TASKS[name]


def data_options(name: str) -> dict[str, Any]:
    """The options of a task's ``prepare`` with their defaults (ListOps: those of its generator, the only ones)."""
    module = get_task(name)
    return dict(module.GENERATOR_DEFAULTS if module is listops else module.DEFAULTS)


def check_data_options(name: str, options: dict[str, Any]) -> None:
    """A DataError for an option the task does not take, a value of the wrong type, or one the task refuses
    (its ``validate_options``, where it has one), before any data is read."""
    merged = check_options(name, options, data_options(name))
    validate = getattr(get_task(name), "validate_options", None)
    if validate is not None:
        validate(merged)


def prepare(name: str, source: Path | str | None = None, data_dir: Path = Path("data/cache"), *, progress: bool = True,
            **options: Any) -> Path:
    """Prepare (or reuse, if its manifest matches) the cache of task ``name`` under ``data_dir / name``."""
    return get_task(name).prepare(source, Path(data_dir) / name, progress=progress, **options)


def load(name: str, cache_path: Path, split: str) -> Dataset:
    """One split ("train", "val" or "test") of a prepared cache, e.g. ``load("listops", cache, "val")``."""
    return get_task(name).load(Path(cache_path), split)


def manifest(cache_path: Path | str) -> dict[str, Any]:
    """The manifest.json of a prepared cache (task, counts, vocab, vocab_size, num_classes, max_len, options, ...)."""
    found = read_manifest(Path(cache_path))
    if found is None:
        raise FileNotFoundError(f"no readable manifest.json in {cache_path}: it is not a prepared cache; run "
                                "`python cli.py prepare TASK` first")
    return found


def layouts() -> str:
    """The accepted source layouts of every task, for help texts and error messages."""
    return "\n".join(module.LAYOUTS for module in TASKS.values())

