"""Library-backed sources shared by Text and Image: Hugging Face (hub, local parquet, save_to_disk) and tfds
(prepared ArrayRecord data through ``tfds.data_source`` without TensorFlow, TFRecord data through TensorFlow).

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

TFDS_INSTALL = "pip install 'lra-soft[tfds]'"


def _tfds():
    """tensorflow-datasets, an optional dependency: only ``tfds:`` sources need it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tfds: sources are read through tensorflow-datasets, which is not installed: "
                        f"{TFDS_INSTALL}") from None
    if not hasattr(tfds, "builder"):  # its __init__ logs and swallows a failed import of its own modules
        raise DataError(f"tensorflow-datasets is installed but failed to import (see the log above): reinstall it "
                        f"with {TFDS_INSTALL}")
    return tfds


def _has_tensorflow() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorflow") is not None


def _build_hint(name: str) -> str:
    # tensorflow-datasets 4.9.10's `tfds build` command also needs apache-beam; the Python call does not
    return (f"prepare it first with `python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"file_format='array_record').download_and_prepare()\"` (or `tfds build {name} "
            f"--file_format=array_record`), or set TFDS_DATA_DIR to the folder that holds it")


def tfds_record(builder, splits: Sequence[str]) -> dict[str, Any]:
    """What identifies prepared tfds data in a cache manifest: builder, config, version, format and split sizes, so
    that new data (another version, config or file format, more or fewer examples) rebuilds the cache."""
    info = builder.info
    config = builder.builder_config.name if builder.builder_config is not None else None
    sizes = {s: {"examples": int(info.splits[s].num_examples), "bytes": int(info.splits[s].num_bytes)}
             for s in splits if s in info.splits}
    return {"tfds": builder.name, "config": config, "version": str(builder.version),
            "file_format": info.file_format.value, "splits": sizes}


def tfds_splits(spec: str, splits: Sequence[str], columns: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
    """``tfds:<name>[/<config>][:<version>]``, prepared in ``TFDS_DATA_DIR`` (or tfds' default folder): per-split
    row iterators and one source record (:func:`tfds_record`).

    ArrayRecord data is read through ``builder.as_data_source`` (random access, no TensorFlow); TFRecord data
    through ``builder.as_dataset``, which needs TensorFlow. Each split is opened here, so that data that is missing
    or unreadable fails before any work; its rows are read lazily."""
    name = spec[5:]
    tfds = _tfds()
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, a bad config or version string, an unreadable dataset_info.json
        raise DataError(f"source {spec}: tfds cannot open {name!r} ({e.__class__.__name__}: {e})") from None
    file_format = builder.info.file_format.value
    if file_format != "array_record" and not _has_tensorflow():
        if not builder.is_prepared():
            raise DataError(f"source {spec}: tfds has no prepared {name} in {builder.data_dir}; "
                            f"{_build_hint(name)} (array_record data is read without TensorFlow)")
        raise DataError(f"source {spec}: its prepared data is stored as {file_format} files, which "
                        f"tensorflow-datasets reads only through TensorFlow, and TensorFlow is not installed: "
                        f"{TFDS_INSTALL} (it brings tensorflow-cpu), or rebuild it as array_record, which is read "
                        f"without TensorFlow: `tfds build {name} --file_format=array_record`")
    opened = {}
    for split in splits:
        try:
            opened[split] = (builder.as_data_source(split=split) if file_format == "array_record"
                             else builder.as_dataset(split=split, shuffle_files=False))
        except Exception as e:  # AssertionError (not prepared), ValueError (unknown split), IO errors
            raise DataError(f"source {spec}: tfds could not open split {split!r} of {name} in "
                            f"{builder.data_dir} ({e.__class__.__name__}: {e}); {_build_hint(name)}") from None
    rows = {s: _tfds_rows(tfds, ds, columns, spec) for s, ds in opened.items()}
    return rows, [tfds_record(builder, splits)]


def _tfds_rows(tfds, ds, columns: Sequence[str], spec: str) -> Iterator[tuple]:
    """Examples of an opened split as tuples of ``columns``; a data source by index, a tf.data pipeline as numpy."""
    examples = (ds[i] for i in range(len(ds))) if hasattr(ds, "__getitem__") else tfds.as_numpy(ds)
    for example in examples:
        missing = [c for c in columns if c not in example]
        if missing:
            raise DataError(f"source {spec}: examples have no feature(s) {missing}; found {sorted(example)}")
        yield tuple(example[c] for c in columns)
