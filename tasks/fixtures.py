"""Tiny, format-exact copies of every LRA source layout, for tests and smoke runs (docs/pitfalls.md, #1).

Each builder writes one layout under ``root`` and returns the path to pass as ``--source``; the contents are seeded and
synthetic (a few KB), the bytes follow the real formats. The committed copies under ``data/fixtures/`` are made by

    python -m tasks.fixtures data/fixtures

and each gives at least 8 examples in every split once prepared:

    data/fixtures/listops                      basic_{train,val,test}.tsv, CRLF, header (24 / 8 / 8 rows)
    data/fixtures/text                         aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt (80 / 20 reviews)
    data/fixtures/retrieval                    tsv_data/new_aan_pairs.{train,eval,test}.tsv (24 / 8 / 8 pairs)
    data/fixtures/image                        cifar-10-batches-py/ data_batch_1..5 + test_batch (80 / 16 images)
    data/fixtures/pathfinder                   pathfinder32/curv_contour_length_14/ (81 PNGs, one of 0 bytes)

The CIFAR binary batches and the Hugging Face parquet files are only built by the tests (``cifar_binary``,
``imdb_parquet``, ``cifar_parquet``).
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np

from lra_soft.atomic import atomic_write_bytes
from tasks import listops

SEED = 1234
WORDS = {0: ["dull", "awful", "boring", "weak", "mess", "flat"], 1: ["great", "superb", "moving", "funny", "rich"]}
COMMON = ["the", "film", "plot", "actors", "a", "was", "and", "scenes", "café", "\"quoted\"", "it's"]


def listops_tsv(root: Path, sizes: tuple[int, int, int] = (24, 8, 8)) -> Path:
    """basic_{train,val,test}.tsv written by the seeded generator with short trees (10 < length < 60)."""
    listops.write_generated(Path(root), seed=SEED, num_train=sizes[0], num_val=sizes[1], num_test=sizes[2],
                            min_length=10, max_length=60, generator=1)  # the committed files' generator
    return Path(root)


def _review(rng: np.random.Generator, label: int) -> str:
    words = [str(rng.choice(WORDS[label] if rng.random() < 0.3 else COMMON)) for _ in range(rng.integers(20, 60))]
    return " ".join(words).capitalize() + ".<br /><br />" + " ".join(words[:5]) + "!\n"


def aclimdb(root: Path, per_class: tuple[int, int] = (40, 10)) -> Path:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, UTF-8 with HTML breaks and a trailing newline."""
    rng = np.random.default_rng(SEED)
    base = Path(root) / "aclImdb"
    for split, n in zip(("train", "test"), per_class):
        for label, name in enumerate(("neg", "pos")):
            for i in range(n):
                rating = int(rng.integers(7, 11) if label else rng.integers(1, 5))
                atomic_write_bytes(base / split / name / f"{i}_{rating}.txt", _review(rng, label).encode("utf-8"))
    return base


def imdb_parquet(root: Path) -> Path:
    """The hub's layout ``plain_text/{train,test}-00000-of-00001.parquet`` (columns text, label) from ``aclimdb``.

    Texts are stored stripped: the released reviews carry no surrounding whitespace, our fixture files end in a newline
    to exercise the tfds-style ``strip()`` of the aclImdb reader.
    """
    import datasets
    from tasks.text import _acl_files
    acl = aclimdb(Path(root) / "raw")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    out = Path(root) / "imdb" / "plain_text"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [(p.read_text(encoding="utf-8").strip(), label) for p, label in _acl_files(acl, split)]
        ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]},
                                        features=features)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    return out.parent


def _aan_text(rng: np.random.Generator) -> str:
    """A Python bytes repr as in the AAN files: b'...' with \\n and \\xNN escapes and literal double quotes."""
    body = " ".join(str(rng.choice(["we", "propose", "a", "\"novel\"", "parser", "model", "corpus", "(1999)"]))
                    for _ in range(rng.integers(10, 40)))
    raw = (body + "\n" + "na\u00efve results").encode("utf-8")
    return repr(raw)


def aan_tsv(root: Path, sizes: tuple[int, int, int] = (24, 8, 8)) -> Path:
    """tsv_data/new_aan_pairs.{train,eval,test}.tsv: no header, label<TAB>id1<TAB>id2<TAB>text1<TAB>text2, LF."""
    rng = np.random.default_rng(SEED)
    base = Path(root) / "tsv_data"
    for split, n in zip(("train", "eval", "test"), sizes):
        lines = []
        for i in range(n):
            label = i % 2
            ids = [f"{split[0].upper()}{rng.integers(0, 99):02d}-{rng.integers(1000, 9999)}" for _ in range(2)]
            lines.append("\t".join([str(label), *ids, _aan_text(rng), _aan_text(rng)]))
        atomic_write_bytes(base / f"new_aan_pairs.{split}.tsv", ("\n".join(lines) + "\n").encode("ascii"))
    return base


def _cifar_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth synthetic 32x32 RGB images whose colour depends on the label, so a model can learn something."""
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:32, 0:32]
    base = (xx[None, :, :, None] * 4 + yy[None, :, :, None] * 3 + labels[:, None, None, None] * 20
            + np.array([0, 60, 120])[None, None, None, :])
    noise = rng.integers(0, 30, (n, 32, 32, 3))
    return ((base + noise) % 256).astype(np.uint8), labels


def _rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # (n, 3072): R plane, G plane, B plane


def cifar_batches(n_train: int = 80, n_test: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{batch name: (rgb (n, 32, 32, 3), labels (n,))} for data_batch_1..5 and test_batch."""
    rng = np.random.default_rng(SEED)
    per = n_train // 5
    batches = {f"data_batch_{i}": _cifar_images(per, rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_images(n_test, rng)
    return batches


def cifar_python(root: Path) -> Path:
    """cifar-10-batches-py: pickled dicts {batch_label, labels, data (n, 3072) uint8, filenames} with byte keys.

    Written with protocol 2 and numpy's pre-2.0 module name, as the original Python 2 files reference it.
    """
    base = Path(root) / "cifar-10-batches-py"
    for name, (images, labels) in cifar_batches().items():
        batch = {b"batch_label": f"{name} of 6".encode(), b"labels": [int(v) for v in labels],
                 b"data": _rows(images), b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        data = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        atomic_write_bytes(base / name, data)
    atomic_write_bytes(base / "batches.meta", pickle.dumps({b"label_names": [b"airplane", b"automobile", b"bird",
                       b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]}, protocol=2))
    return base


def cifar_binary(root: Path) -> Path:
    """cifar-10-batches-bin: <name>.bin of 3073-byte records, label byte then R, G, B planes."""
    base = Path(root) / "cifar-10-batches-bin"
    for name, (images, labels) in cifar_batches().items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], _rows(images)], axis=1)
        atomic_write_bytes(base / f"{name}.bin", records.tobytes())
    return base


def cifar_parquet(root: Path) -> Path:
    """The hub's ``plain_text/{train,test}-00000-of-00001.parquet`` with columns img (PNG) and label."""
    import datasets
    from PIL import Image
    out = Path(root) / "cifar10" / "plain_text"
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    batches = cifar_batches()
    split_batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    for split, names in split_batches.items():
        images = np.concatenate([batches[n][0] for n in names])
        labels = np.concatenate([batches[n][1] for n in names])
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in images],
                                         "label": [int(v) for v in labels]}, features=features)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    return out.parent


def _path_image(rng: np.random.Generator, connected: bool, size: int) -> np.ndarray:
    """Two bright dots and a dashed line that joins them (label 1) or stops half way (label 0), black background."""
    image = np.zeros((size, size), dtype=np.uint8)
    (y0, x0), (y1, x1) = rng.integers(3, size - 3, (2, 2))
    steps = 4 * size
    stop = steps if connected else steps // 2
    for t in range(0, stop):
        if (t // 3) % 2 == 0:
            y, x = round(y0 + (y1 - y0) * t / steps), round(x0 + (x1 - x0) * t / steps)
            image[y, x] = 200
    for y, x in ((y0, x0), (y1, x1)):
        image[y - 1:y + 2, x - 1:x + 2] = 255
    return image


def pathfinder_tree(root: Path, batches: tuple[str, ...] = ("0", "2", "10"), per_batch: int = 27,
                    empty: tuple[str, int] = ("0", 5), resolution: int = 32,
                    difficulty: str = "curv_contour_length_14") -> Path:
    """pathfinder32/<difficulty>/imgs/<batch>/sample_<i>.png + metadata/<batch>.npy (text), with one 0-byte PNG."""
    from PIL import Image
    rng = np.random.default_rng(SEED)
    base = Path(root) / f"pathfinder{resolution}" / difficulty
    for batch in batches:
        lines = []
        for i in range(per_batch):
            label = int(rng.integers(0, 2))
            png = b""
            if (batch, i) != empty:
                buffer = io.BytesIO()
                Image.fromarray(_path_image(rng, bool(label), resolution), mode="L").save(buffer, format="PNG")
                png = buffer.getvalue()
            atomic_write_bytes(base / "imgs" / batch / f"sample_{i}.png", png)
            # snakes2.py accumulate_meta: folder, file, nimg, label, continuity, contour_length, distractor_length,
            # paddle_length, paddle_thickness, paddle_margin, n_contrasts
            lines.append(f"imgs/{batch} sample_{i}.png {i} {label} 1.8 14 14 5 1.5 4 1")
        atomic_write_bytes(base / "metadata" / f"{batch}.npy", ("\n".join(lines) + "\n").encode("ascii"))
    return Path(root)


def build_all(root: Path) -> dict[str, Path]:
    """Write every committed fixture under ``root``; returns the --source path of each task."""
    root = Path(root)
    listops_tsv(root / "listops")
    aclimdb(root / "text")
    aan_tsv(root / "retrieval")
    cifar_python(root / "image")
    pathfinder_tree(root / "pathfinder")
    return {task: root / task for task in ("listops", "text", "retrieval", "image", "pathfinder")}


if __name__ == "__main__":
    for task, path in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "data/fixtures")).items():
        print(f"{task:<11} {path}")
