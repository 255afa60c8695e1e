"""Text: byte-level IMDb sentiment (pos/neg), documents cut to 4,000 bytes by default (LRA, Tay et al. 2021).

Encoding is tfds' ``ByteTextEncoder`` as in the official pipeline: UTF-8 bytes, id = byte + 1, pad 0, vocabulary 257.
The length is an explicit option (docs/pitfalls.md, #8): 4000 ("Text 4K", the paper; padded to 4096), while LRA's
official config used 1000. IMDb has no validation split (docs/pitfalls.md, #9): by default a seeded ``val_fraction`` of
train is carved off; ``val=test`` follows LRA and Nystromformer, which select on the test set (then val and test are
the same reviews).

Sources (``--source``): the raw ``aclImdb/`` folder; Hugging Face ``hf:stanfordnlp/imdb`` (hub) or a folder of local
parquet files / a ``save_to_disk`` folder; ``tfds:imdb_reviews`` when tensorflow-datasets is installed. aclImdb
reviews are ``strip()``-ed as tfds' builder does; hub/parquet/tfds texts are used exactly as stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lra_soft.config import EncoderConfig, TrainConfig
from tasks._common import (DataError, SplitWriter, TokenDataset, build_cache, byte_vocab, check_options,
                           find_layout, load_cache, next_power_of_two, require_nonempty, tree_record)
from tasks._sources import (hf_records, hf_splits, is_hf, is_tfds, parquet_files, split_indices, tfds_splits)

NAME = "text"
TOKENIZER_VERSION = "bytes-1"
LABELS = ("neg", "pos")                       # 0 = neg, 1 = pos in aclImdb, tfds and the hub alike

DEFAULTS = {
    "max_length": 4000,     # bytes kept per review (docs/pitfalls.md, #8); the official LRA config used 1000
    "val": "split",         # "split": seeded val_fraction of train; "test": LRA's choice, test doubles as val
    "val_fraction": 0.1,    # share of train carved off as val when val="split"
    "seed": 0,              # seed of that carve-out
}
MODEL = EncoderConfig(vocab_size=257, num_classes=2, max_len=next_power_of_two(DEFAULTS["max_length"]))
TRAIN = TrainConfig(batch_size=32, steps=20000, warmup=8000, eval_every=500)
LAYOUTS = """\
  text: aclImdb/ with train/{pos,neg}/*.txt and test/{pos,neg}/*.txt (aclImdb_v1.tar.gz from
    https://ai.stanford.edu/~amaas/data/sentiment/), given as the aclImdb folder or its parent;
    hf:stanfordnlp/imdb (Hugging Face hub; offline: HF_HUB_OFFLINE=1 with a cached copy); a folder of parquet files
    whose names contain 'train' and 'test' (e.g. the hub repo's plain_text/ folder) or a datasets.save_to_disk folder;
    tfds:imdb_reviews (needs tensorflow-datasets and its prepared data). Options: """ + \
    ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()) + "."


def encode(text: str | bytes, max_length: int) -> np.ndarray:
    """ByteTextEncoder ids of the first ``max_length`` UTF-8 bytes: id = byte + 1 (0 stays padding)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data[:max_length], dtype=np.uint8).astype(np.uint16) + 1  # (L,)


# --------------------------------------------------------------------------------------------------- sources

def _is_acl(path: Path) -> bool:
    return all((path / split / label).is_dir() for split in ("train", "test") for label in LABELS)


def _acl_files(root: Path, split: str) -> list[tuple[Path, int]]:
    """Review files of one aclImdb split, ordered by label then numeric review id (``<id>_<rating>.txt``)."""
    def key(p: Path):
        stem = p.stem.split("_")[0]
        return (int(stem), p.name) if stem.isdigit() else (1 << 62, p.name)
    return [(p, label) for label, name in enumerate(LABELS)
            for p in sorted((root / split / name).glob("*.txt"), key=key) if p.is_file()]


def _read_acl(root: Path, split: str):
    """(review bytes, label): the file's bytes as stored, whatever their encoding, stripped as tfds does."""
    for path, label in _acl_files(root, split):
        text = path.read_bytes().strip()
        if not text:
            raise DataError(f"{path}: empty review (no bytes but whitespace); restore it from aclImdb_v1.tar.gz or "
                            f"remove it")
        yield text, label


def _records(source: str | Path) -> tuple[dict[str, Any], Any, list[Path] | None]:
    """Open a source: ({"train": iterable, "test": iterable} of (text, label), source records or a callable
    computing them, the source files whose sizes and times decide whether to recompute them)."""
    if is_tfds(source):
        return *tfds_splits(str(source), ("train", "test"), ("text", "label")), None
    if is_hf(source):
        return *hf_splits(str(source), ("train", "test"), ("text", "label")), None
    source = Path(source).expanduser()
    if source.is_dir() and (parquet_files(source) or (source / "dataset_dict.json").is_file()):
        return *hf_records(source, ("train", "test"), ("text", "label")), None
    root = find_layout(source, [".", "aclImdb"], _is_acl, LAYOUTS)
    files = {split: [p for p, _ in _acl_files(root, split)] for split in ("train", "test")}

    def records() -> list[dict[str, Any]]:
        return [tree_record(files[split], root, f"{split}/{{pos,neg}}/*.txt") for split in ("train", "test")]

    return {split: _read_acl(root, split) for split in ("train", "test")}, records, files["train"] + files["test"]


# --------------------------------------------------------------------------------------------------- prepare / load

def prepare(source: Path | str | None, cache_dir: Path, *, progress: bool = True, **options: Any) -> Path:
    """Encode IMDb reviews byte by byte into ``cache_dir`` with train/val/test splits."""
    opts = check_options(NAME, options, DEFAULTS)
    if opts["val"] not in ("split", "test"):
        raise DataError(f"option val={opts['val']!r} of task 'text' must be 'split' (seeded part of train) or "
                        f"'test' (LRA: test doubles as validation)")
    if not 0 < opts["val_fraction"] < 1 or opts["max_length"] < 1:
        raise DataError(f"need 0 < val_fraction < 1 and max_length >= 1, got {opts}")
    if source is None:
        raise DataError(f"task 'text' needs --source (IMDb is not bundled). Accepted layouts:\n{LAYOUTS}")
    splits, records, files = _records(source)
    identity = {"task": NAME, "tokenizer_version": TOKENIZER_VERSION, "options": opts, "sources": records}
    return build_cache(cache_dir, identity, lambda tmp: _build(tmp, splits, opts, progress, str(source)),
                       source_files=files)


def _build(out: Path, splits: dict[str, Any], opts: dict[str, Any], progress: bool, where: str) -> dict[str, Any]:
    data = {}
    for split in ("train", "test"):
        data[split] = [(encode(text, opts["max_length"]), int(label))
                       for text, label in tqdm(splits[split], desc=f"encoding {split}", unit="review",
                                               disable=not progress)]
        bad = [label for _, label in data[split] if label not in (0, 1)]
        if bad:
            raise DataError(f"{where}: split {split!r} has label(s) {sorted(set(bad))} outside 0 (neg) / 1 (pos)")
        empty = [i for i, (ids, _) in enumerate(data[split]) if not len(ids)]
        if empty:
            raise DataError(f"{where}: split {split!r} has {len(empty)} empty review(s), the first at row {empty[0]}")
    if opts["val"] == "test":
        parts = {"train": data["train"], "val": data["test"], "test": data["test"]}
    else:
        train_idx, val_idx = split_indices(len(data["train"]), opts["val_fraction"], opts["seed"])
        parts = {"train": [data["train"][i] for i in train_idx], "val": [data["train"][i] for i in val_idx],
                 "test": data["test"]}
    counts, longest = {}, 0
    for split, examples in parts.items():
        writer = SplitWriter(out, split, vocab_size=257, num_classes=2)
        for ids, label in examples:
            writer.add(label, ids)
        counts[split] = writer.close()
        longest = max(longest, writer.longest)
    require_nonempty(counts, where)
    return {"counts": counts, "vocab": byte_vocab(), "vocab_size": 257, "num_classes": 2,
            "max_len": next_power_of_two(opts["max_length"]), "max_tokens": opts["max_length"], "longest": longest,
            "pair": False, "label_names": list(LABELS)}


def load(cache_dir: Path, split: str) -> TokenDataset:
    return load_cache(cache_dir, split, NAME)
