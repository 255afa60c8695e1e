"""Shared machinery of the LRA task modules: atomic cache building, manifests, hashing, token stores, batching.

A prepared cache is one directory per task::

    manifest.json                      written last: a cache without it (or with a stale one) is never used
    {split}.tokens.npy                 flat token ids of all examples of the split, concatenated (uint8/uint16)
    {split}.offsets.npy                int64 (n + 1,): example i is tokens[offsets[i]:offsets[i + 1]]
    {split}.labels.npy                 int64 (n,)
    {split}.tokens2.npy / .offsets2.npy  second document of a pair (retrieval)

Everything is built in a temporary sibling directory and renamed into place only once complete, so an interrupted
prepare never leaves a directory that looks like a finished cache (writes are atomic). One process builds a cache at a
time: the others wait on the cross-process lock ``.{name}.lock`` beside it, then reuse what it built. The manifest
records the size and sha256 of every array (``arrays``); a cache is checked against them whenever it is opened, and a
corrupt one is rebuilt by ``prepare`` or refused by ``load_cache`` naming the file (docs/data.md, "The cache").
Token id 0 is padding in every task and never a real token (docs/pitfalls.md, #5).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from torch.utils.data import Dataset

from lra_soft.atomic import atomic_open, atomic_write_json, current_umask
from lra_soft.locks import hold

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Keys of manifest.json that decide whether a cache can be reused; everything else is a description of the cache.
IDENTITY_KEYS = ("task", "tokenizer_version", "options", "sources")


# --------------------------------------------------------------------------------------------------- errors

class DataError(ValueError):
    """A problem with the user's data or options that the message tells them how to fix."""


class CorruptCache(DataError):
    """A cache array that is missing, truncated or differs from the size and sha256 its manifest records."""


def note(message: str) -> None:
    """One line on stderr that leaves progress bars intact."""
    tqdm.write(message, file=sys.stderr)


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


def array_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every ``.npy`` of a cache directory, as manifest.json records them under ``arrays``."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(Path(directory).glob("*.npy"))}


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


def disk_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (what a cache takes on disk, as the user sees it)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


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


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold the cross-process lock of ``cache_dir``, the file ``.{name}.lock`` beside it (the cache itself is renamed
    over when rebuilt), waiting without a time limit for a process that holds it, after saying so on stderr.

    ``lra_soft.locks.hold``: the kernel drops the lock when its process dies, so the lock of a killed process never
    blocks. Where no lock file can be made (no such folder, or a read-only cache on a shared file system) nothing
    can be built either, and the cache is used without a lock.
    """
    cache_dir = Path(cache_dir)
    if not (cache_dir.parent.is_dir() and os.access(cache_dir.parent, os.W_OK)):
        yield
        return
    with hold(cache_dir.parent / f".{cache_dir.name}.lock", f"the cache {cache_dir}", wait=True, on_wait=note):
        yield


def build_cache(cache_dir: Path, identity: dict[str, Any], build: Callable[[Path], dict[str, Any]], *,
                source_files: Iterable[Path] | None = None) -> Path:
    """Reuse ``cache_dir`` if its manifest matches ``identity`` and its arrays their records; otherwise build it afresh,
    atomically, holding ``cache_lock`` throughout: concurrent prepares of one cache build it once.

    ``identity`` holds the task, tokenizer version, options and the source records (``sources``: a list, or a
    callable returning it, since hashing 200,000 PNGs takes a while). With ``source_files`` the records are only
    computed when the files' sizes or modification times differ from those of the cached build (``source_stat``);
    a cache whose records differ is rebuilt, never reused. So is one whose arrays differ from the sizes and sha256 of
    its manifest's ``arrays`` (truncated or changed after it was written); a cache built before arrays were recorded
    gets its records added once its arrays are found consistent.

    ``build(tmp_dir)`` writes the arrays into an empty temporary directory and returns the rest of the manifest
    (counts, vocab, ...). The manifest is written last, then the directory is renamed over the old cache. On any
    exception (KeyboardInterrupt included) the temporary directory is removed and the old cache is left as it was;
    what a killed build left is removed by the next holder of the lock.
    """
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache_dir):
        for stale in [*cache_dir.parent.glob(f".{cache_dir.name}.building-*"),
                      *cache_dir.parent.glob(f".{cache_dir.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build: only the lock's holder builds
        head = json.loads(json.dumps({k: identity[k] for k in IDENTITY_KEYS if k != "sources"}))
        stat = stat_digest(source_files) if source_files is not None else None
        old = read_manifest(cache_dir)
        same_head = old is not None and all(old.get(k) == v for k, v in head.items())
        if same_head and stat is not None and old.get("source_stat") == stat:
            if _intact(cache_dir, old):
                return cache_dir
            same_head = False  # corrupt: rebuilt below
        sources = identity["sources"]() if callable(identity["sources"]) else identity["sources"]
        identity = {**head, "sources": json.loads(json.dumps(sources))}  # normalised as the saved manifest will be
        if same_head and old.get("sources") == identity["sources"] and _intact(cache_dir, old):
            if stat is not None and old.get("source_stat") != stat:  # same content, touched or copied files
                atomic_write_json(cache_dir / MANIFEST, {**read_manifest(cache_dir), "source_stat": stat})
            return cache_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.building-", dir=cache_dir.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            manifest = {**identity, "source_stat": stat, **build(tmp)}
            atomic_write_json(tmp / MANIFEST, {**manifest, "arrays": array_records(tmp)})
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


def _intact(cache_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether every split of a cache opens and matches its manifest's records; if not, says which file, to stderr.

    A cache without records (built before they were kept) is checked for consistency (array headers, sizes and
    offsets) and its records are then added to its manifest, so that later opens verify it.
    """
    try:
        for split in SPLITS:
            TokenDataset(cache_dir, split, pair=bool(manifest.get("pair")), manifest=manifest)
    except CorruptCache as e:
        note(f"rebuilding the cache from its source: {e}")
        return False
    if "arrays" not in manifest:
        atomic_write_json(cache_dir / MANIFEST, {**manifest, "arrays": array_records(cache_dir)})
    return True


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

# (device, inode, size, mtime_ns, sha256) of the arrays this process has hashed: each is verified once per process
# (``prepare`` and then ``load`` of three splits would hash the same files again).
_VERIFIED: set[tuple[int, int, int, int, str]] = set()

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def split_files(split: str, pair: bool = False) -> list[str]:
    """The file names of one split's arrays, labels first."""
    names = ["labels", "tokens", "offsets"] + (["tokens2", "offsets2"] if pair else [])
    return [f"{split}.{name}.npy" for name in names]


def map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap, tuple[int, int, int, int]]:
    """A read-only array over the memory map of a whole ``.npy`` file, the map and the file's (device, inode, size,
    mtime_ns). The map pins that very file: a cache renamed over it later changes nothing that is read through it.
    A missing, truncated or malformed file is a CorruptCache naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            pin = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if st.st_size == 0:
                raise CorruptCache(f"{path}: empty file (0 bytes)")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError("unsupported .npy format version")
            shape, fortran, dtype = read_header(f)
            start = f.tell()
    except CorruptCache:
        raise
    except FileNotFoundError:
        raise CorruptCache(f"{path}: missing") from None
    except (ValueError, OSError, SyntaxError, TypeError) as e:  # what numpy's header parser raises on garbage
        raise CorruptCache(f"{path}: not a readable .npy array ({e.__class__.__name__}: {e})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or start + count * dtype.itemsize != st.st_size:
        raise CorruptCache(f"{path}: {st.st_size} bytes, but its header announces {count} x {dtype} after "
                           f"{start} bytes of header (the file is truncated or damaged)")
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=start)
    return array.reshape(shape, order="F" if fortran else "C"), buffer, pin


def verify_mapped(path: Path, buffer: mmap.mmap, pin: tuple[int, int, int, int], record: dict[str, Any]) -> None:
    """Compare a mapped file (``map_npy``) with its manifest record (size, sha256), once per process and file."""
    key = (*pin, str(record.get("sha256")))
    if key in _VERIFIED:
        return
    if pin[2] != record.get("size") or hashlib.sha256(buffer).hexdigest() != record.get("sha256"):
        raise CorruptCache(f"{path}: its bytes differ from the size and sha256 that manifest.json records (changed "
                           f"or damaged after it was written)")
    _VERIFIED.add(key)


class TokenDataset(Dataset):
    """One split of a prepared cache; items ``{"input_ids": (L,) long, "label": () long[, "input_ids2"]}``.

    Every array of the split is memory-mapped at construction (``map_npy``), so the dataset reads the cache it
    opened and no other even if the cache is rebuilt meanwhile, and never loads a whole split into memory. With
    ``manifest`` (its ``arrays`` records) the files are checked against their sizes and sha256 (``verify``; at
    construction unless ``verify=False``; 0.08 s of CPU for the 105 MB of ListOps). A copy unpickled into a DataLoader
    worker maps the files again and fails loudly if they are no longer the same files.
    """

    def __init__(self, cache_dir: Path, split: str, pair: bool = False, manifest: dict[str, Any] | None = None,
                 verify: bool = True):
        self.cache_dir, self.split, self.pair = Path(cache_dir), split, pair
        self.task = (manifest or {}).get("task", "TASK")
        self.records = (manifest or {}).get("arrays")  # None: a cache from before array records, not hash-checked
        self._map()
        self.pins = {name: pin for name, (_, _, pin) in self._mapped.items()}
        try:
            self._check_shapes()
        except CorruptCache as e:
            raise CorruptCache(f"{e}; {self._advice()}") from None
        if verify:
            self.verify()

    def _advice(self) -> str:
        return f"run `python cli.py prepare {self.task}` (with the same --source and --data-option) to rebuild it"

    def _map(self) -> None:
        try:
            self._mapped = {name: map_npy(self.cache_dir / name) for name in split_files(self.split, self.pair)}
        except CorruptCache as e:
            raise CorruptCache(f"{e}; {self._advice()}") from None
        self._arrays = {name.split(".")[1]: array for name, (array, _, _) in self._mapped.items()}
        self.labels = self._arrays["labels"]

    def _check_shapes(self) -> None:
        """Offsets that index the tokens and one label per example (what a damaged cache without records shows)."""
        a, where = self._arrays, self.cache_dir / f"{self.split}.*.npy"
        for tokens, offsets in [("tokens", "offsets")] + ([("tokens2", "offsets2")] if self.pair else []):
            t, o = a[tokens], a[offsets]
            if (a["labels"].ndim != 1 or t.ndim != 1 or o.shape != (len(a["labels"]) + 1,) or o.dtype.kind != "i"
                    or o[0] != 0 or o[-1] != len(t) or np.any(np.diff(o) < 0)):
                raise CorruptCache(f"{where}: {tokens}, {offsets} and labels do not fit together (shapes {t.shape}, "
                                   f"{o.shape}, {a['labels'].shape})")

    def verify(self) -> None:
        """Hash each mapped array against the manifest's record; a CorruptCache names the first that differs."""
        if self.records is None:
            return
        for name, (_, buffer, pin) in self._mapped.items():
            path = self.cache_dir / name
            try:
                if name not in self.records:
                    raise CorruptCache(f"{path}: not listed in the manifest.json beside it")
                verify_mapped(path, buffer, pin, self.records[name])
            except CorruptCache as e:
                raise CorruptCache(f"{e}; {self._advice()}") from None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_mapped", "_arrays", "labels")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map()
        changed = [name for name, (_, _, pin) in self._mapped.items() if pin != self.pins[name]]
        if changed:
            raise DataError(f"{self.cache_dir / changed[0]}: the cache was rebuilt after this dataset opened it, so "
                            f"its copies would read other data; start the job again")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for split {self.split!r} of {len(self)} examples")
        i = i % len(self)
        a = self._arrays
        item = {"input_ids": _slice(a["tokens"], a["offsets"], i), "label": torch.tensor(int(self.labels[i]))}
        if self.pair:
            item["input_ids2"] = _slice(a["tokens2"], a["offsets2"], i)
        return item


def _slice(tokens: np.ndarray, offsets: np.ndarray, i: int) -> torch.Tensor:
    return torch.from_numpy(np.array(tokens[offsets[i]:offsets[i + 1]], dtype=np.int64))  # (L,)


def load_cache(cache_dir: Path, split: str, task: str) -> TokenDataset:
    """Open one split of a prepared cache, after checking its manifest belongs to ``task`` and is complete, and that
    its arrays are the ones the manifest records (a CorruptCache naming the file if not; ``prepare`` rebuilds it).

    The manifest is read and the arrays mapped under ``cache_lock``, so a concurrent rebuild is never seen half way;
    they are hashed after it is released (concurrent processes of one job hash at the same time).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    cache_dir = Path(cache_dir)
    with cache_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        if manifest is None:
            raise FileNotFoundError(f"no prepared {task} cache at {cache_dir} (manifest.json missing): run "
                                    f"`python cli.py prepare {task}` first")
        if manifest.get("task") != task:
            raise DataError(f"{cache_dir} holds a cache of task {manifest.get('task')!r}, not {task!r}")
        dataset = TokenDataset(cache_dir, split, pair=bool(manifest.get("pair", False)), manifest=manifest,
                               verify=False)
    dataset.verify()
    return dataset


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
