"""Library-backed sources shared by Text and Image: Hugging Face (hub, local parquet, save_to_disk) and tfds.

Hub access is checked with one short TCP connection first, so that without network the user gets a clear error
within seconds instead of minutes of retries. Nothing here runs at import; ``datasets`` and
``tensorflow_datasets`` are imported only when such a source is used.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from tasks._common import DataError, file_record

HUB_TIMEOUT_S = 3.0


def is_hf(source: str | Path) -> bool:
    return str(source).startswith("hf:")


def is_tfds(source: str | Path) -> bool:
    return str(source).startswith("tfds:")


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded carve-out: (kept, held-out) indices, both in original order; ``round(n * fraction)`` held out."""
    held = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[held:]), np.sort(perm[:held])


# --------------------------------------------------------------------------------------------------- Hugging Face

def _datasets():
    """Hugging Face ``datasets``, an optional dependency: only hub, parquet and saved-dataset sources need it."""
    try:
        import datasets
    except ImportError:
        raise DataError("this source is read through Hugging Face datasets, which is not installed: "
                        "pip install 'lra-soft[hf]' (or pip install datasets)") from None
    return datasets


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                       "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def _offline_flags(offline: bool):
    """Honour HF_HUB_OFFLINE even when it was set after ``datasets`` / ``huggingface_hub`` read it at import."""
    datasets = _datasets()
    import huggingface_hub.constants as hub
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _hub_help(name: str) -> str:
    local = (f"download the parquet files from https://huggingface.co/datasets/{name} (folder plain_text/) and pass "
             f"that folder as --source")
    if _offline():
        return f"HF_HUB_OFFLINE is set and the Hugging Face cache holds no copy: unset it to download, or {local}"
    return (f"either run with network access, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face "
            f"cache, or {local}")


def check_hub_reachable(name: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when the hub endpoint (``HF_ENDPOINT``) cannot be reached."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise DataError(f"cannot reach the Hugging Face hub at {endpoint} ({e.__class__.__name__}: {e}) to load "
                        f"{name}: {_hub_help(name)}") from None


def hf_splits(spec: str, splits: Sequence[str], columns: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
    """Load ``hf:<repo>`` from the hub (or, offline, from the HF cache): per-split row iterators and records."""
    name = spec[3:]
    if not _offline():
        check_hub_reachable(name)
    datasets = _datasets()
    try:
        with _offline_flags(_offline()):
            ds = datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        raise DataError(f"could not load {name} from the Hugging Face hub ({e.__class__.__name__}: {e}): "
                        f"{_hub_help(name)}") from None
    missing = [s for s in splits if s not in ds]
    if missing:
        raise DataError(f"hub dataset {name} has no split(s) {missing} (it has {sorted(ds)})")
    records = [{"hub": name, "split": s, "rows": len(ds[s]), "fingerprint": getattr(ds[s], "_fingerprint", None)}
               for s in splits]
    return {s: _rows(ds[s], columns, name) for s in splits}, records


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*.parquet") if p.is_file())


def _split_of(path: Path, splits: Sequence[str]) -> str | None:
    for split in splits:
        if re.search(rf"(^|[-_./]){split}([-_.]|$)", path.name):
            return split
    return None


def hf_records(folder: Path, splits: Sequence[str], columns: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
    """Local Hugging Face copies: parquet files named by split (hub layout) or a ``save_to_disk`` folder."""
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        records = [file_record(p, folder) for p in sorted(folder.rglob("*")) if p.is_file()]
        return {s: _from_disk(folder, s, columns) for s in splits}, records
    files = {s: [p for p in parquet_files(folder) if _split_of(p, splits) == s] for s in splits}
    missing = [s for s, fs in files.items() if not fs]
    if missing:
        raise DataError(f"{folder}: no parquet file for split(s) {missing}; the file names must contain the split "
                        f"name (as the hub's plain_text/train-00000-of-00001.parquet). Found: "
                        f"{[p.name for p in parquet_files(folder)]}")
    records = [file_record(p, folder) for s in splits for p in files[s]]
    return {s: _from_parquet(files[s], columns) for s in splits}, records


def _from_parquet(files: list[Path], columns: Sequence[str]) -> Iterator[tuple]:
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="lra-hf-") as cache:  # keep the user's HF cache clean
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache)
        yield from _rows(ds, columns, ", ".join(f.name for f in files))


def _from_disk(folder: Path, split: str, columns: Sequence[str]) -> Iterator[tuple]:
    datasets = _datasets()
    ds = datasets.load_from_disk(str(folder))
    if split not in ds:
        raise DataError(f"{folder}: saved dataset has no split {split!r} (it has {sorted(ds)})")
    yield from _rows(ds[split], columns, str(folder))


def _rows(ds, columns: Sequence[str], where: str) -> Iterator[tuple]:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {ds.column_names}")
    for row in ds.select_columns(list(columns)):
        yield tuple(row[c] for c in columns)


# --------------------------------------------------------------------------------------------------- tfds

def tfds_splits(spec: str, splits: Sequence[str], columns: Sequence[str]) -> dict[str, Iterator[tuple]]:
    """``tfds:<name>`` through tensorflow-datasets, only when it is installed and the data is already prepared."""
    name = spec[5:]
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"source {spec} needs tensorflow-datasets, which is not installed: pip install "
                        f"'lra-soft[tfds]' tensorflow, then `tfds build {name}`; or use one of the other "
                        f"layouts (see `python cli.py prepare --help`)") from None

    def rows(split: str) -> Iterator[tuple]:
        try:
            ds = tfds.load(name, split=split, download=False, data_dir=os.environ.get("TFDS_DATA_DIR"))
        except Exception as e:
            raise DataError(f"tfds could not load {name}[{split}] ({e.__class__.__name__}: {e}); prepare it first "
                            f"with `tfds build {name}` or set TFDS_DATA_DIR") from None
        for example in tfds.as_numpy(ds):
            yield tuple(example[c] for c in columns)

    return {s: rows(s) for s in splits}
