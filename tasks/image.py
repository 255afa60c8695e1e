"""Image: grayscale CIFAR-10 classified pixel by pixel, 1,024 tokens a sequence (LRA, Tay et al. 2021).

Split as LRA's ``tfds.load('cifar10')``: train[:90%] / train[90%:] / test (45,000 / 5,000 / 10,000), slicing each
source in its own order (docs/pitfalls.md, #3: tfds orders the train images differently from the batch files and
the hub, so the 5,000 validation images are LRA's only with ``tfds:cifar10``). Images are flattened row-major.

Grayscale (docs/pitfalls.md, #11), option ``grayscale``:
  ``tf`` (default, LRA): ``tf.image.rgb_to_grayscale`` then ``convert_image_dtype`` back to uint8, i.e. in float32
    ``floor((0.2989 R + 0.5870 G + 0.1140 B) / 255 * 255.5)``;
  ``pil``: PIL ``convert("L")`` / torchvision ``Grayscale``, ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``,
    ITU-R 601-2 luma rounded; equal to ``tf`` or one level above it.
Token id = pixel + ``pixel_offset`` (default 1, vocabulary 257) so black is never the padding id 0
(docs/pitfalls.md, #5: the reference models mask pixel 0 as padding); ``pixel_offset=0`` reproduces the reference ids
(vocabulary 256).

``cifar-10-batches-py`` holds pickles: they are read with a restricted unpickler that builds only the dict of
bytes, lists and numpy arrays these files contain, and refuses any other global (an arbitrary pickle can run code).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lra_soft.config import EncoderConfig, TrainConfig
from tasks._common import (DataError, SplitWriter, TokenDataset, build_cache, check_options, file_record,
                           find_layout, load_cache, pixel_vocab, require_nonempty)
from tasks._sources import hf_records, hf_splits, is_hf, is_tfds, parquet_files, tfds_splits

NAME = "image"
TOKENIZER_VERSION = "pixels-1"
SIDE, PIXELS, RECORD = 32, 1024, 3073         # binary record: 1 label byte + 1024 R + 1024 G + 1024 B
TRAIN_FRACTION = 0.9                          # official train[:90%] / train[90%:]

DEFAULTS = {
    "grayscale": "tf",      # "tf" (LRA, tf.image.rgb_to_grayscale) or "pil" (PIL/torchvision); see docstring
    "pixel_offset": 1,      # token id = pixel + offset; 0 reproduces the reference ids where black = padding id
}
MODEL = EncoderConfig(vocab_size=257, num_classes=10, max_len=PIXELS)
TRAIN = TrainConfig(batch_size=256, steps=35000, warmup=175, eval_every=175)
LAYOUTS = """\
  image: cifar-10-batches-py/ (data_batch_1..5, test_batch: python pickles) or cifar-10-batches-bin/
    (data_batch_1..5.bin, test_batch.bin), from https://www.cs.toronto.edu/~kriz/cifar.html, given as that folder or
    its parent; hf:uoft-cs/cifar10 (Hugging Face hub; offline: HF_HUB_OFFLINE=1 with a cached copy); a folder of
    parquet files whose names contain 'train' and 'test' (columns img, label) or a datasets.save_to_disk folder;
    tfds:cifar10 (needs tensorflow-datasets and its prepared data). Options: """ + \
    ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()) + "."


# --------------------------------------------------------------------------------------------------- pixels

def to_grayscale(rgb: np.ndarray, formula: str = "tf") -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 (...) gray, with the ``tf`` or ``pil`` formula of the module docstring."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if formula == "tf":
        x = rgb.astype(np.float32) * np.float32(1 / 255)       # convert_image_dtype(uint8 -> float32)
        gray = x[..., 0] * np.float32(0.2989) + x[..., 1] * np.float32(0.5870) + x[..., 2] * np.float32(0.1140)
        return (gray * np.float32(255.5)).astype(np.uint8)     # convert_image_dtype(float32 -> uint8): truncating cast
    if formula == "pil":
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    raise DataError(f"option grayscale={formula!r} of task 'image' must be 'tf' or 'pil'")


def _planes_to_hwc(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows (n, 3072) = 1024 R, 1024 G, 1024 B, each row-major 32x32 -> (n, 32, 32, 3)."""
    return rows.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------------- python pickles

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR python batches: numpy arrays, dicts, lists, bytes and str only; any other global fails."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes (e.g. re-saved batches)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "numpy.core.multiarray":  # CIFAR's Python 2 pickles name numpy's pre-2.0 module
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` file -> (rgb (n, 32, 32, 3) uint8, labels (n,) int64)."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()
    except Exception as e:  # damaged bytes make the unpickler raise nearly any type, MemoryError included
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e.__class__.__name__}: {e}); the file may be "
                        f"corrupt or hostile, re-download cifar-10-python.tar.gz") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: a CIFAR-10 python batch is a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * PIXELS:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if not isinstance(labels, list) or len(labels) != len(data) or any(type(v) is not int for v in labels):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} ints, one per image")
    labels = np.asarray(labels, dtype=object)
    return _planes_to_hwc(data), _check_labels(labels, path).astype(np.int64)


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-bin`` file of 3073-byte records -> (rgb (n, 32, 32, 3), labels (n,))."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(f"{path}: size {raw.size} is not a positive multiple of {RECORD} bytes (1 label + 3072 "
                        f"pixels per image); the file is truncated or not a CIFAR-10 binary batch")
    records = raw.reshape(-1, RECORD)
    return _planes_to_hwc(records[:, 1:]), _check_labels(records[:, 0].astype(np.int64), path)


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} of image {int(bad[0])} out of range 0..9")
    return labels


def _batch_files(root: Path, suffix: str) -> list[Path]:
    files = [p for p in root.glob(f"data_batch_*{suffix}") if p.name[len("data_batch_"):len(p.name) - len(suffix)]
             .isdigit() and p.is_file()]
    return sorted(files, key=lambda p: int(p.name[len("data_batch_"):len(p.name) - len(suffix)]))


def _is_py(path: Path) -> bool:
    return (path / "test_batch").is_file() and bool(_batch_files(path, ""))


def _is_bin(path: Path) -> bool:
    return (path / "test_batch.bin").is_file() and bool(_batch_files(path, ".bin"))


# --------------------------------------------------------------------------------------------------- sources

def _open(source: str | Path) -> tuple[dict[str, Any], Any, list[Path] | None]:
    """({"train": iterable, "test": iterable} of (rgb (n, 32, 32, 3), labels (n,)) chunks, source records or a
    callable computing them, the source files whose sizes and times decide whether to recompute them)."""
    if is_tfds(source):
        splits, records = tfds_splits(str(source), ("train", "test"), ("image", "label"))
        return {s: _chunks(rows) for s, rows in splits.items()}, records, None
    if is_hf(source):
        splits, records = hf_splits(str(source), ("train", "test"), ("img", "label"))
        return {s: _chunks(rows) for s, rows in splits.items()}, records, None
    source = Path(source).expanduser()
    if source.is_dir() and (parquet_files(source) or (source / "dataset_dict.json").is_file()):
        splits, records = hf_records(source, ("train", "test"), ("img", "label"))
        return {s: _chunks(rows) for s, rows in splits.items()}, records, None
    layouts = [".", "cifar-10-batches-py", "cifar-10-batches-bin"]
    root = find_layout(source, layouts, lambda p: _is_py(p) or _is_bin(p), LAYOUTS)
    if _is_py(root):
        files = {"train": _batch_files(root, ""), "test": [root / "test_batch"]}
        reader = read_python_batch
    else:
        files = {"train": _batch_files(root, ".bin"), "test": [root / "test_batch.bin"]}
        reader = read_binary_batch
    paths = files["train"] + files["test"]
    return ({s: (reader(p) for p in files[s]) for s in ("train", "test")},
            lambda: [file_record(p, root) for p in paths], paths)


def _chunks(rows, size: int = 1000):
    """Library rows of (image, label) -> chunks of (rgb (n, 32, 32, 3), labels (n,)); PIL, dict or array images."""
    images, labels = [], []
    for image, label in rows:
        images.append(_rgb(image))
        labels.append(int(label))
        if len(images) == size:
            yield np.stack(images), np.asarray(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int64)


def _rgb(image) -> np.ndarray:
    from PIL import Image
    if isinstance(image, dict):  # parquet written without Hugging Face feature metadata: {"bytes": png, "path": ...}
        image = Image.open(io.BytesIO(image["bytes"]))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.shape != (SIDE, SIDE, 3):
        raise DataError(f"CIFAR-10 images must be 32x32 RGB, got an array of shape {rgb.shape}")
    return rgb


# --------------------------------------------------------------------------------------------------- prepare / load

def prepare(source: Path | str | None, cache_dir: Path, *, progress: bool = True, **options: Any) -> Path:
    """Convert CIFAR-10 to grayscale pixel sequences in ``cache_dir`` with LRA's 90/10 train/val split."""
    opts = check_options(NAME, options, DEFAULTS)
    to_grayscale(np.zeros((1, 3), np.uint8), opts["grayscale"])  # validates the option before any reading
    if opts["pixel_offset"] not in (0, 1):
        raise DataError(f"option pixel_offset={opts['pixel_offset']} of task 'image' must be 0 or 1")
    if source is None:
        raise DataError(f"task 'image' needs --source (CIFAR-10 is not bundled). Accepted layouts:\n{LAYOUTS}")
    splits, records, files = _open(source)
    identity = {"task": NAME, "tokenizer_version": TOKENIZER_VERSION, "options": opts, "sources": records}
    return build_cache(cache_dir, identity, lambda tmp: _build(tmp, splits, opts, progress, str(source)),
                       source_files=files)


def _build(out: Path, splits: dict[str, Any], opts: dict[str, Any], progress: bool, where: str) -> dict[str, Any]:
    offset, vocab_size = opts["pixel_offset"], 256 + opts["pixel_offset"]
    data = {}
    for split in ("train", "test"):
        chunks = list(tqdm(splits[split], desc=f"reading {split}", unit="batch", disable=not progress))
        if not chunks:
            raise DataError(f"{where}: split {split!r} holds no images")
        gray = np.concatenate([to_grayscale(c[0], opts["grayscale"]) for c in chunks])  # (n, 32, 32)
        data[split] = gray.reshape(len(gray), PIXELS), np.concatenate([c[1] for c in chunks])
        _check_labels(data[split][1], Path(where))
    n_train = round(len(data["train"][1]) * TRAIN_FRACTION)
    parts = {"train": (data["train"][0][:n_train], data["train"][1][:n_train]),
             "val": (data["train"][0][n_train:], data["train"][1][n_train:]), "test": data["test"]}
    counts = {}
    for split, (pixels, labels) in parts.items():
        writer = SplitWriter(out, split, vocab_size=vocab_size, num_classes=10, min_id=offset)
        for row, label in zip(pixels, labels):
            writer.add(label, row.astype(np.uint16) + offset)
        counts[split] = writer.close()
    require_nonempty(counts, where)
    return {"counts": counts, "vocab": pixel_vocab(offset), "vocab_size": vocab_size, "num_classes": 10,
            "max_len": PIXELS, "max_tokens": PIXELS, "longest": PIXELS, "pair": False, "image_shape": [SIDE, SIDE],
            "grayscale": opts["grayscale"]}


def load(cache_dir: Path, split: str) -> TokenDataset:
    return load_cache(cache_dir, split, NAME)
