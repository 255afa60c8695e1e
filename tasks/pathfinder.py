"""Pathfinder: are the two circles joined by a dashed path? 32x32 images read pixel by pixel (LRA, Tay et al. 2021).

Layout of the LRA release: ``pathfinder{32,64,128,256}/<difficulty>/imgs/<batch>/sample_<i>.png`` (8-bit grayscale)
and ``metadata/<batch>.npy``, which are plain text despite the suffix (docs/pitfalls.md, #13): one line per image,
fields 0 = image folder, 1 = file name, 3 = label. LRA's Pathfinder is pathfinder32 ``curv_contour_length_14`` (hard);
Path-X is ``resolution=128`` with the same difficulty (16,384 tokens). Zero-byte PNGs (one is known,
``pathfinder32/curv_baseline/imgs/0/sample_172.png``; docs/pitfalls.md, #12) are skipped, counted and listed in the
manifest. There is no canonical split (docs/pitfalls.md, #3): a seeded 80/10/10 permutation is drawn and written to
``split.json``. Token id = pixel + ``pixel_offset`` (default 1) so that the black background is not padding
(docs/pitfalls.md, #5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lra_soft.atomic import atomic_write_json
from lra_soft.config import EncoderConfig, TrainConfig
from tasks._common import (DataError, SplitWriter, TokenDataset, build_cache, check_options, file_record,
                           load_cache, pixel_vocab, require_nonempty, show_line, tree_record)

NAME = "pathfinder"
TOKENIZER_VERSION = "pixels-1"
FRACTIONS = {"train": 0.8, "val": 0.1}        # test takes the rest
DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")

DEFAULTS = {
    "resolution": 32,                         # 32 = Pathfinder, 128 = Path-X; also 64, 256
    "difficulty": "curv_contour_length_14",   # hard; curv_contour_length_9 = intermediate, curv_baseline = easy
    "seed": 0,                                # seed of the 80/10/10 split
    "pixel_offset": 1,                        # token id = pixel + offset; 0 = reference ids (black = padding id)
}
MODEL = EncoderConfig(vocab_size=257, num_classes=2, max_len=32 * 32)
TRAIN = TrainConfig(batch_size=256, steps=62400, warmup=312, eval_every=312)
LAYOUTS = """\
  pathfinder: the LRA release's pathfinder{32,64,128,256}/<difficulty>/ folders with imgs/<batch>/sample_<i>.png and
    metadata/<batch>.npy (text), from https://storage.googleapis.com/long-range-arena/lra_release.gz, given as
    lra_release/lra_release/, lra_release/, the folder holding pathfinder32/, S4's pathfinder/ (holding
    pathfinder32/...), or the difficulty folder itself. Options: """ + \
    ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()) + "."


def _is_difficulty_dir(path: Path) -> bool:
    return (path / "metadata").is_dir() and (path / "imgs").is_dir()


def locate(source: Path, resolution: int, difficulty: str) -> Path:
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"source {source} does not exist. Accepted layouts:\n{LAYOUTS}")
    sub = f"pathfinder{resolution}/{difficulty}"
    candidates = [".", difficulty, sub, f"lra_release/{sub}", f"lra_release/lra_release/{sub}", f"pathfinder/{sub}"]
    for candidate in candidates:
        if _is_difficulty_dir(source / candidate):
            return source / candidate
    raise DataError(f"no {sub} folder (with metadata/ and imgs/) under {source}. Accepted layouts:\n{LAYOUTS}")


def _metadata_files(root: Path) -> list[Path]:
    files = [p for p in (root / "metadata").glob("*.npy") if p.is_file()]
    return sorted(files, key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))


def read_metadata(root: Path) -> list[tuple[Path, int, str]]:
    """(image path, label, "metadata file:line") for every line of the text ``metadata/*.npy`` files."""
    files = _metadata_files(root)
    if not files:
        raise DataError(f"{root / 'metadata'}: no metadata/*.npy files (text lists of images and labels)")
    entries, inside = [], root.resolve()
    for meta in files:
        text = meta.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{meta}: empty metadata file (it lists no images); restore it from the release")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            where = f"{meta}:{number}"
            if len(fields) < 4:
                raise DataError(f"{where}: expected at least 4 space-separated fields (folder, file, _, label), got "
                                f"{len(fields)}: {show_line(line)}")
            try:
                label = int(fields[3])
            except ValueError:
                raise DataError(f"{where}: label field {fields[3]!r} is not an integer: {show_line(line)}") from None
            if label not in (0, 1):
                raise DataError(f"{where}: label {label} out of range (0 or 1): {show_line(line)}")
            path = root / fields[0] / fields[1]
            if not path.is_file():
                raise DataError(f"{where}: image {path} listed in the metadata does not exist")
            if not path.resolve().is_relative_to(inside):
                raise DataError(f"{where}: image {path} lies outside {root}: {show_line(line)}")
            entries.append((path, label, where))
    return entries


def read_png(path: Path, resolution: int, where: str) -> np.ndarray:
    """8-bit grayscale pixels (resolution, resolution) of one PNG; colour PNGs converted as decode_png(channels=1)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = image if image.mode == "L" else image.convert("L")
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable image {path} (listed at {where}): {e.__class__.__name__}: {e}") from None
    if pixels.shape != (resolution, resolution):
        raise DataError(f"image {path} (listed at {where}) is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                        f"{resolution}x{resolution}: check the resolution option")
    return pixels


def split_order(n: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded 80/10/10 permutation of range(n): indices per split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(n * FRACTIONS["train"]), round(n * FRACTIONS["val"])
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


def prepare(source: Path | None, cache_dir: Path, *, progress: bool = True, **options: Any) -> Path:
    """Read the PNGs and text metadata of one Pathfinder difficulty into ``cache_dir`` with a seeded split."""
    opts = check_options(NAME, options, DEFAULTS)
    if opts["resolution"] not in (32, 64, 128, 256) or opts["difficulty"] not in DIFFICULTIES:
        raise DataError(f"resolution must be one of 32, 64, 128, 256 and difficulty one of {DIFFICULTIES}; got "
                        f"resolution={opts['resolution']}, difficulty={opts['difficulty']!r}")
    if opts["pixel_offset"] not in (0, 1):
        raise DataError(f"option pixel_offset={opts['pixel_offset']} of task 'pathfinder' must be 0 or 1")
    if source is None:
        raise DataError(f"task 'pathfinder' needs --source (it is only in the LRA release). Accepted layouts:\n"
                        f"{LAYOUTS}")
    root = locate(Path(source), opts["resolution"], opts["difficulty"])
    entries = read_metadata(root)
    images = [p for p, _, _ in entries]

    def records() -> list[dict[str, Any]]:
        pngs = tree_record(images, root, "imgs/*/*.png", progress=progress)
        return [*(file_record(p, root) for p in _metadata_files(root)), pngs]

    identity = {"task": NAME, "tokenizer_version": TOKENIZER_VERSION, "options": opts, "sources": records}
    return build_cache(cache_dir, identity, lambda tmp: _build(tmp, root, entries, opts, progress),
                       source_files=[*_metadata_files(root), *images])


def _build(out: Path, root: Path, entries: list, opts: dict[str, Any], progress: bool) -> dict[str, Any]:
    empty = [e for e in entries if e[0].stat().st_size == 0]
    kept = [e for e in entries if e[0].stat().st_size > 0]
    if empty and progress:
        tqdm.write(f"pathfinder: skipped {len(empty)} empty PNG(s): "
                   f"{', '.join(p.relative_to(root).as_posix() for p, _, _ in empty[:5])}"
                   f"{' ...' if len(empty) > 5 else ''}")
    order = split_order(len(kept), opts["seed"])
    offset, res = opts["pixel_offset"], opts["resolution"]
    counts = {}
    with tqdm(total=len(kept), desc="reading PNGs", unit="image", disable=not progress) as bar:
        for split, indices in order.items():
            writer = SplitWriter(out, split, vocab_size=256 + offset, num_classes=2, min_id=offset)
            for i in indices:
                path, label, where = kept[i]
                writer.add(label, read_png(path, res, where).reshape(-1).astype(np.uint16) + offset)
                bar.update()
            counts[split] = writer.close()
    require_nonempty(counts, str(root))
    atomic_write_json(out / "split.json", {
        "seed": opts["seed"], "fractions": {**FRACTIONS, "test": "rest"},
        **{split: [kept[i][0].relative_to(root).as_posix() for i in idx] for split, idx in order.items()}})
    return {"counts": counts, "vocab": pixel_vocab(offset), "vocab_size": 256 + offset, "num_classes": 2,
            "max_len": res * res, "max_tokens": res * res, "longest": res * res, "pair": False,
            "image_shape": [res, res], "split_file": "split.json", "skipped_empty": len(empty),
            "skipped_empty_files": [p.relative_to(root).as_posix() for p, _, _ in empty]}


def load(cache_dir: Path, split: str) -> TokenDataset:
    return load_cache(cache_dir, split, NAME)
