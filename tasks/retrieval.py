"""Retrieval: do two AAN papers cite each other? Byte-level document pairs, 4,000 bytes each (LRA, Tay et al. 2021).

Official files ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (train 147,086 / eval 18,090 / test 17,437): no header,
five tab-separated columns ``label, id1, id2, text1, text2``, quotes are literal characters (LRA reads them with
``use_quote_delim=False``; docs/pitfalls.md, #10: quote-aware or header-skipping CSV readers mis-parse or drop the
first row). Labels are parsed as ``int(float(x))`` (docs/pitfalls.md, #4). The texts look like Python bytes reprs
(``b'...'``); they are encoded as is by default, as the official pipeline and the Nystromformer / xformers / S4 ports
do, and ``decode=true`` evaluates the repr and encodes the bytes it stands for. Encoding: id = byte + 1, the first
``max_length`` bytes of each document. ``eval`` becomes our ``val`` split.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lra_soft.config import EncoderConfig, TrainConfig
from tasks._common import (DataError, SplitWriter, TokenDataset, build_cache, byte_vocab, check_options, file_record,
                           find_layout, load_cache, next_power_of_two, show_line)

NAME = "retrieval"
TOKENIZER_VERSION = "bytes-1"
FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}

DEFAULTS = {
    "max_length": 4000,     # bytes kept per document (official 4000; padded to 4096 by the harness)
    "decode": False,        # False: encode the b'...' repr text as is (reference harnesses); True: ast.literal_eval it
}
MODEL = EncoderConfig(vocab_size=257, num_classes=2, max_len=next_power_of_two(DEFAULTS["max_length"]), pair=True)
TRAIN = TrainConfig(batch_size=32, steps=30000, warmup=800, eval_every=300)
LAYOUTS = """\
  retrieval: a directory holding new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv, new_aan_pairs.test.tsv, given
    directly or as lra_release/lra_release/tsv_data/ (the official lra_release.gz archive,
    https://storage.googleapis.com/long-range-arena/lra_release.gz), lra_release/tsv_data/, tsv_data/ or aan/
    (S4's renamed copy). Options: """ + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()) + "."


def encode(text: bytes, max_length: int) -> np.ndarray:
    return np.frombuffer(text[:max_length], dtype=np.uint8).astype(np.uint16) + 1  # (L,)


def read_tsv(path: Path, decode: bool = False):
    """Yield (line number, label, text1, text2) from an AAN pairs file; malformed lines name file and line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n")
            line = line[:-1] if line.endswith(b"\r") else line
            fields = line.split(b"\t")
            if len(fields) != 5:
                raise DataError(f"{path}:{number}: expected 5 tab-separated fields (label, id1, id2, text1, text2), "
                                f"got {len(fields)}: {show_line(line)}")
            try:
                label = int(float(fields[0]))
            except (ValueError, OverflowError):  # OverflowError: "inf"
                raise DataError(f"{path}:{number}: label {fields[0]!r} is not a number: {show_line(line)}") from None
            if label not in (0, 1):
                raise DataError(f"{path}:{number}: label {label} out of range (0 or 1): {show_line(line)}")
            texts = fields[3:]
            if decode:
                texts = [_literal_bytes(t, path, number, line) for t in texts]
            for k, text in enumerate(texts, start=1):
                if not text:
                    raise DataError(f"{path}:{number}: text{k} is empty{' once decoded' if decode else ''}: "
                                    f"{show_line(line)}")
            yield number, label, texts[0], texts[1]


def _literal_bytes(text: bytes, path: Path, number: int, line: bytes) -> bytes:
    try:
        value = ast.literal_eval(text.decode("utf-8"))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: {[]: 1}
        value = None
    if not isinstance(value, bytes):
        raise DataError(f"{path}:{number}: decode=true needs texts that are Python bytes literals (b'...'), got "
                        f"{show_line(text)}; prepare with decode=false to use the text as is")
    return value


def _has_files(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES.values())


def locate(source: Path) -> Path:
    candidates = [".", "lra_release/lra_release/tsv_data", "lra_release/tsv_data", "tsv_data", "aan"]
    return find_layout(source, candidates, _has_files, LAYOUTS)


def prepare(source: Path | None, cache_dir: Path, *, progress: bool = True, **options: Any) -> Path:
    """Encode the AAN pairs into ``cache_dir``: two byte sequences and a 0/1 label per example."""
    opts = check_options(NAME, options, DEFAULTS)
    if opts["max_length"] < 1:
        raise DataError(f"option max_length must be >= 1, got {opts['max_length']}")
    if source is None:
        raise DataError(f"task 'retrieval' needs --source (AAN is only in the LRA release). Accepted layouts:\n"
                        f"{LAYOUTS}")
    root = locate(Path(source))
    files = {split: root / name for split, name in FILES.items()}
    identity = {"task": NAME, "tokenizer_version": TOKENIZER_VERSION, "options": opts,
                "sources": lambda: [file_record(p, root) for p in files.values()]}

    def build(out: Path) -> dict[str, Any]:
        counts, longest = {}, 0
        for split, path in files.items():
            writer = SplitWriter(out, split, vocab_size=257, num_classes=2, pair=True)
            for _, label, text1, text2 in tqdm(read_tsv(path, opts["decode"]), desc=f"encoding {path.name}",
                                               unit="pair", disable=not progress):
                writer.add(label, encode(text1, opts["max_length"]), encode(text2, opts["max_length"]))
            counts[split] = writer.close()
            if not counts[split]:
                raise DataError(f"{path}: no examples (the file is empty)")
            longest = max(longest, writer.longest)
        return {"counts": counts, "vocab": byte_vocab(), "vocab_size": 257, "num_classes": 2,
                "max_len": next_power_of_two(opts["max_length"]), "max_tokens": opts["max_length"],
                "longest": longest, "pair": True}

    return build_cache(cache_dir, identity, build, source_files=files.values())


def load(cache_dir: Path, split: str) -> TokenDataset:
    return load_cache(cache_dir, split, NAME)
