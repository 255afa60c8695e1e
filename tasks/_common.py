"""Shared machinery of the LRA task modules: atomic cache building, manifests, hashing, token stores, batching.

A prepared cache is one directory per task::

    manifest.json                      written last: a cache without it (or with a stale one) is never used
    {split}.tokens.npy                 flat token ids of all examples of the split, concatenated (uint8/uint16)
    {split}.offsets.npy                int64 (n + 1,): example i is tokens[offsets[i]:offsets[i + 1]]
    {split}.labels.npy                 int64 (n,)
    {split}.tokens2.npy / .offsets2.npy  second document of a pair (retrieval)

Everything is built in a temporary sibling directory and renamed into place only once complete, so an interrupted
prepare never leaves a directory that looks like a finished cache (writes are atomic).
Token id 0 is padding in every task and never a real token (docs/pitfalls.md, #5).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from torch.utils.data import Dataset

from lra_soft.atomic import atomic_open, atomic_write_json, current_umask

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Keys of manifest.json that decide whether a cache can be reused; everything else is a description of the cache.
IDENTITY_KEYS = ("task", "tokenizer_version", "options", "sources")


# --------------------------------------------------------------------------------------------------- errors

class DataError(ValueError):
    """A problem with the user's data or options that the message tells them how to fix."""


def show_line(line: str | bytes, limit: int = 200) -> str:
    """A line of a source file as it should appear in an error message: repr, cut to ``limit`` characters."""
    text = repr(line)
    return text if len(text) <= limit else text[:limit] + f"... ({len(line)} characters)"


def check_options(task: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over a task's defaults; unknown keys fail listing the valid ones with their defaults."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        raise DataError(f"unknown option(s) {unknown} for task {task!r}; valid options (with defaults): {valid}")
    merged = dict(defaults)
    for key, value in options.items():
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:  # exact: True is an int to isinstance, not an acceptable seed
            raise DataError(f"option {key}={value!r} of task {task!r} must be of type {want.__name__}")
        merged[key] = value
    return merged


def find_layout(source: Path, candidates: Sequence[str], found: Callable[[Path], bool], layouts: str) -> Path:
    """The first ``source / candidate`` that holds the expected files; otherwise an error listing the layouts."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"source {source} does not exist. Accepted layouts:\n{layouts}")
    for candidate in candidates:
        path = source / candidate
        if path.is_dir() and found(path):
            return path
    raise DataError(f"no recognised data layout under {source}. Accepted layouts:\n{layouts}")


# --------------------------------------------------------------------------------------------------- hashing

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, root: Path) -> dict[str, Any]:
    """One source file as recorded in manifest.json: path relative to the source root, size, sha256."""
    path = Path(path)
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def tree_record(files: Iterable[Path], root: Path, name: str, progress: bool = False) -> dict[str, Any]:
    """Many small files (an image or review folder) as one record: count, total size, sha256 over (path, sha256) lines.

    Listing 200,000 PNGs one by one would make manifest.json tens of MB; this digest changes whenever any file's
    path or content does. ``progress``: a bar (on a terminal only) over the files, minutes for Pathfinder's 200,000.
    """
    digest, size, count = hashlib.sha256(), 0, 0
    paths = sorted(Path(p) for p in files)
    for path in tqdm(paths, desc=f"hashing {name}", unit="file", disable=None if progress else True):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\t{hashlib.sha256(data).hexdigest()}\n".encode())
        size += len(data)
        count += 1
    return {"path": name, "files": count, "size": size, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------------------------------- atomic writes

def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through ``lra_soft.atomic.atomic_open``, the one atomic writer (whole caches: ``build_cache``)."""
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def stat_digest(paths: Iterable[Path]) -> str:
    """A cheap fingerprint of files: sha256 over (absolute path, size, mtime_ns); no file is read."""
    digest = hashlib.sha256()
    for path in sorted(Path(p).resolve() for p in paths):
        st = path.stat()
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def build_cache(cache_dir: Path, identity: dict[str, Any], build: Callable[[Path], dict[str, Any]], *,
                source_files: Iterable[Path] | None = None) -> Path:
    """Reuse ``cache_dir`` if its manifest matches ``identity``; otherwise build it afresh, atomically.

    ``identity`` holds the task, tokenizer version, options and the source records (``sources``: a list, or a
    callable returning it, since hashing 200,000 PNGs takes a while). With ``source_files`` the records are only
    computed when the files' sizes or modification times differ from those of the cached build (``source_stat``);
    a cache whose records differ is rebuilt, never reused.

    ``build(tmp_dir)`` writes the arrays into an empty temporary directory and returns the rest of the manifest
    (counts, vocab, ...). The manifest is written last, then the directory is renamed over the old cache. On any
    exception (KeyboardInterrupt included) the temporary directory is removed and the old cache is left as it was.
    """
    cache_dir = Path(cache_dir)
    head = json.loads(json.dumps({k: identity[k] for k in IDENTITY_KEYS if k != "sources"}))
    stat = stat_digest(source_files) if source_files is not None else None
    old = read_manifest(cache_dir)
    same_head = old is not None and all(old.get(k) == v for k, v in head.items())
    if same_head and stat is not None and old.get("source_stat") == stat:
        return cache_dir
    sources = identity["sources"]() if callable(identity["sources"]) else identity["sources"]
    identity = {**head, "sources": json.loads(json.dumps(sources))}  # normalised as the saved manifest will be
    if same_head and old.get("sources") == identity["sources"]:
        if stat is not None:  # same content, touched or copied files: remember the new stat
            atomic_write_json(cache_dir / MANIFEST, {**old, "source_stat": stat})
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.building-", dir=cache_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        manifest = {**identity, "source_stat": stat, **build(tmp)}
        atomic_write_json(tmp / MANIFEST, manifest)
        if cache_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
            os.replace(cache_dir, trash / cache_dir.name)
            os.replace(tmp, cache_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir


# --------------------------------------------------------------------------------------------------- token stores

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16)


class SplitWriter:
    """Streams the examples of one split to disk: flat tokens, offsets and labels, as .npy files.

    Tokens go to a raw scratch file as they come (a split can be GBs: Path-X is 200k x 16,384 tokens) and become a
    .npy at ``close``; nothing is held in memory beyond the offsets and labels.
    """

    def __init__(self, directory: Path, split: str, vocab_size: int, num_classes: int, pair: bool = False,
                 min_id: int = 1):
        self.directory, self.split, self.pair, self.min_id = Path(directory), split, pair, min_id
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.dtype = token_dtype(vocab_size)
        self.labels: list[int] = []
        self.streams = [self._open("")] + ([self._open("2")] if pair else [])
        self.longest = 0

    def _open(self, suffix: str) -> dict[str, Any]:
        raw = self.directory / f".{self.split}.tokens{suffix}.raw"
        return {"suffix": suffix, "raw": raw, "file": open(raw, "wb"), "offsets": [0]}

    def add(self, label: int, *sequences: np.ndarray) -> None:
        if len(sequences) != len(self.streams):
            raise ValueError(f"expected {len(self.streams)} sequence(s) per example, got {len(sequences)}")
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise DataError(f"label {label} out of range [0, {self.num_classes}) in split {self.split!r}")
        for stream, seq in zip(self.streams, sequences):
            seq = np.asarray(seq)
            if seq.size and (int(seq.min()) < self.min_id or int(seq.max()) >= self.vocab_size):
                raise ValueError(f"token ids must lie in [{self.min_id}, {self.vocab_size}) (0 is padding); got "
                                 f"[{int(seq.min())}, {int(seq.max())}]")
            stream["file"].write(seq.astype(self.dtype, copy=False).tobytes())
            stream["offsets"].append(stream["offsets"][-1] + seq.size)
            self.longest = max(self.longest, int(seq.size))
        self.labels.append(label)

    def close(self) -> int:
        """Turn the scratch files into .npy arrays; returns the number of examples."""
        for stream in self.streams:
            stream["file"].close()
            tokens = np.fromfile(stream["raw"], dtype=self.dtype)
            atomic_save_npy(self.directory / f"{self.split}.tokens{stream['suffix']}.npy", tokens)
            atomic_save_npy(self.directory / f"{self.split}.offsets{stream['suffix']}.npy",
                            np.asarray(stream["offsets"], dtype=np.int64))
            stream["raw"].unlink()
        atomic_save_npy(self.directory / f"{self.split}.labels.npy", np.asarray(self.labels, dtype=np.int64))
        return len(self.labels)


def require_nonempty(counts: dict[str, int], where: str) -> None:
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"empty split(s) {empty} read from {where}: check that the source holds all three splits "
                        f"(counts: {counts})")


def byte_vocab() -> list[str]:
    """Byte-level vocabulary (ByteTextEncoder): id 0 = <pad>, id b + 1 = byte b."""
    return ["<pad>"] + [f"<0x{b:02X}>" for b in range(256)]


def pixel_vocab(offset: int) -> list[str]:
    """Pixel vocabulary: id = value + offset; with offset 1, id 0 is <pad> and black is id 1 (docs/pitfalls.md, #5)."""
    return (["<pad>"] if offset else []) + [f"px{v}" for v in range(256)]


# --------------------------------------------------------------------------------------------------- reading

class TokenDataset(Dataset):
    """One split of a prepared cache; items ``{"input_ids": (L,) long, "label": () long[, "input_ids2"]}``.

    Arrays are opened with ``mmap_mode="r"`` on first access in each process, so the dataset pickles cheaply into
    DataLoader workers and never loads a whole split into memory.
    """

    def __init__(self, cache_dir: Path, split: str, pair: bool = False):
        self.cache_dir, self.split, self.pair = Path(cache_dir), split, pair
        self.labels = np.load(self.cache_dir / f"{split}.labels.npy", mmap_mode="r")
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None, "labels": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.labels = np.load(self.cache_dir / f"{self.split}.labels.npy", mmap_mode="r")

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            names = ["tokens", "offsets"] + (["tokens2", "offsets2"] if self.pair else [])
            self._arrays = {n: np.load(self.cache_dir / f"{self.split}.{n}.npy", mmap_mode="r") for n in names}
        return self._arrays

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for split {self.split!r} of {len(self)} examples")
        i = i % len(self)
        a = self._open()
        item = {"input_ids": _slice(a["tokens"], a["offsets"], i), "label": torch.tensor(int(self.labels[i]))}
        if self.pair:
            item["input_ids2"] = _slice(a["tokens2"], a["offsets2"], i)
        return item


def _slice(tokens: np.ndarray, offsets: np.ndarray, i: int) -> torch.Tensor:
    return torch.from_numpy(np.array(tokens[offsets[i]:offsets[i + 1]], dtype=np.int64))  # (L,)


def load_cache(cache_dir: Path, split: str, task: str) -> TokenDataset:
    """Open one split of a prepared cache, after checking its manifest belongs to ``task`` and is complete."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise FileNotFoundError(f"no prepared {task} cache at {cache_dir} (manifest.json missing): run "
                                f"`python cli.py prepare {task}` first")
    if manifest.get("task") != task:
        raise DataError(f"{cache_dir} holds a cache of task {manifest.get('task')!r}, not {task!r}")
    return TokenDataset(cache_dir, split, pair=bool(manifest.get("pair", False)))


def collate(items: Sequence[dict[str, torch.Tensor]], pad_to: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of dataset items with 0 to the batch's longest sequence, or to ``pad_to`` when it is > 0.

    Returns ``input_ids`` (b, n) long, ``mask`` (b, n) bool (True = real token), ``label`` (b,) long and, for pairs,
    ``input_ids2`` / ``mask2``. Fixed ``pad_to`` is what landmark and Linformer variants need (docs/pitfalls.md, #16).
    """
    if not items:
        raise ValueError("collate got an empty batch")
    batch = {"label": torch.stack([item["label"] for item in items]).long()}  # (b,)
    keys = [("input_ids", "mask")] + ([("input_ids2", "mask2")] if "input_ids2" in items[0] else [])
    for key, mask_key in keys:
        seqs = [item[key] for item in items]
        longest = max(len(s) for s in seqs)
        n = pad_to or longest
        if longest > n:
            raise ValueError(f"a sequence of length {longest} does not fit pad_to={pad_to}; raise pad_to to at "
                             f"least {longest} or truncate the data when preparing it")
        ids = torch.zeros(len(seqs), n, dtype=torch.long)  # (b, n)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = s
        batch[key] = ids
        batch[mask_key] = torch.arange(n)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]  # (b, n)
    return batch


def next_power_of_two(n: int) -> int:
    """The harness pads data lengths up to a power of two (2000 -> 2048, 4000 -> 4096)."""
    return 1 << max(0, int(n) - 1).bit_length()
