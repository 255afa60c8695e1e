"""Property-based fuzzing of every source reader with hypothesis, on damaged copies of the committed fixtures.

Each example copies one fixture, damages one file of it (a truncation, a flipped or replaced byte, bytes inserted or
cut, the file emptied or re-encoded, a column added or removed, a field replaced by random text) and prepares it.
The property: the reader either succeeds and leaves a cache whose every example reads back, or raises a DataError
whose first line names the damaged file (and its line, where the damage is in one), and leaves no cache that looks
complete. Any other exception, a hang past the deadline, or a half-written cache fails the test. Zero-byte
Pathfinder PNGs are the one documented skip (docs/data.md). ImageFolder (ImageNet) reads images lazily: there each
item either decodes or raises a ValueError naming the image.

The number of examples is bounded (``SETTINGS``: 40 per reader) and the examples are derandomized (the same on every
run, so a failure reproduces); ``pytest --hypothesis-show-statistics`` reports the examples tried per reader and how
many ended in a clean error or a complete cache.
"""
import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="hypothesis comes with the [dev] extra")  # absent where the GPU check runs
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tasks
from tasks._common import MANIFEST, DataError, read_manifest
from tasks.fixtures import cifar_binary

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "data" / "fixtures"

# LRA_SOFT_FUZZ_EXAMPLES=1000 (and LRA_SOFT_FUZZ_RANDOM=1 for new examples each run) fuzzes longer, by hand.
SETTINGS = settings(max_examples=int(os.environ.get("LRA_SOFT_FUZZ_EXAMPLES", 40)), deadline=timedelta(seconds=20),
                    database=None, derandomize=os.environ.get("LRA_SOFT_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------- damage

ENCODINGS = ["utf-16", "utf-32", "cp500", "latin-1"]


class Damage(bytes):
    """Damaged file contents that hypothesis reports by what was done to them, not by their (long) bytes."""

    def __new__(cls, what: str, data: bytes):
        self = super().__new__(cls, data)
        self.what = what
        return self

    def __repr__(self) -> str:
        return f"<{self.what}>"


@st.composite
def position(draw, data: bytes) -> int:
    """A byte offset, half of the time in the first 256 bytes, where headers and the first line are."""
    return draw(st.one_of(st.integers(0, min(len(data), 256) - 1), st.integers(0, len(data) - 1)))


@st.composite
def damaged_bytes(draw, data: bytes) -> Damage:
    """Any file, damaged."""
    kind = draw(st.sampled_from(["truncate", "flip", "byte", "insert", "cut", "empty", "encoding"]))
    if kind == "empty" or not data:
        return Damage("empty", b"")
    at = draw(position(data))
    if kind == "truncate":
        return Damage(f"truncated to {at} bytes", data[:at])
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return Damage(f"bit {bit} of byte {at} flipped", data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:])
    if kind == "byte":
        value = draw(st.integers(0, 255))
        return Damage(f"byte {at} set to {value}", data[:at] + bytes([value]) + data[at + 1:])
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=16))
        return Damage(f"{junk!r} inserted at {at}", data[:at] + junk + data[at:])
    if kind == "cut":
        n = draw(st.integers(1, 64))
        return Damage(f"{n} bytes cut at {at}", data[:at] + data[at + n:])
    encoding = draw(st.sampled_from(ENCODINGS))
    text = data.decode("latin-1") + ("" if encoding != "latin-1" else " caf\u00e9")  # latin-1 is not UTF-8
    return Damage(f"re-encoded as {encoding}", text.encode(encoding))


@st.composite
def damaged_lines(draw, data: bytes, sep: bytes) -> Damage:
    """Damage to a file of lines of ``sep``-separated fields: any byte damage, or a column added, removed or
    replaced by random text in one line."""
    kind = draw(st.sampled_from(["bytes", "bytes", "extra column", "missing column", "field"]))
    if kind == "bytes":
        return draw(damaged_bytes(data))
    lines = data.split(b"\n")
    i = draw(st.integers(0, max(0, len(lines) - 2)))  # the last piece is what follows the final newline
    end = b"\r" if lines[i].endswith(b"\r") else b""
    fields = lines[i].removesuffix(b"\r").split(sep)
    j = draw(st.integers(0, len(fields) - 1))
    if kind == "extra column":
        fields.insert(j, draw(st.text(max_size=8)).encode("utf-8"))
    elif kind == "missing column" and len(fields) > 1:
        del fields[j]
    else:
        fields[j] = draw(st.text(max_size=12)).encode("utf-8")
    lines[i] = sep.join(fields) + end
    return Damage(f"{kind} in line {i + 1} (field {j + 1})", b"\n".join(lines))


# --------------------------------------------------------------------------------------------------- the property

def _copy(fixture: Path, into: Path) -> Path:
    shutil.copytree(fixture, into)
    return into


def _check_cache(cache: Path, name: str) -> None:
    """A cache that prepare returned: complete, and every example of every split reads back."""
    manifest = read_manifest(cache)
    assert manifest is not None and set(manifest["arrays"]) == {p.name for p in cache.glob("*.npy")}
    for split in ("train", "val", "test"):
        ds = tasks.load(name, cache, split)
        assert len(ds) == manifest["counts"][split] > 0
        for i in range(len(ds)):
            item = ds[i]
            for key in ("input_ids", "input_ids2"):
                if key in item:
                    ids = item[key]
                    assert len(ids) > 0 and 0 < int(ids.min()) and int(ids.max()) < manifest["vocab_size"]


def _prepare_cleanly(name: str, source: Path, damaged: Path, line: bool, **options) -> str:
    """Prepare ``source``; 'ok' with a complete cache, or 'error' with a DataError that names ``damaged`` (and a
    line of it when ``line``) and no complete-looking cache. Any other exception propagates and fails the test."""
    data = source.parent / "cache"
    try:
        cache = tasks.prepare(name, source, data, progress=False, **options)
    except DataError as e:
        first = str(e).splitlines()[0]
        assert str(damaged) in first, first
        if line and re.search(re.escape(str(damaged)) + r":\d+", first) is None:
            assert re.search(r"empty|no examples|header", first), first  # a whole-file problem
        assert not (data / name / MANIFEST).exists()
        assert not list(data.glob(f".{name}.building-*")) if data.exists() else True
        return "error"
    _check_cache(cache, name)
    return "ok"


# --------------------------------------------------------------------------------------------------- readers

@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(file=st.sampled_from(["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]), data=st.data())
def test_listops_tsv(file, data):
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(FIXTURES / "listops", Path(tmp) / "src")
        path = src / file
        damaged = data.draw(damaged_lines(path.read_bytes(), b"\t"), label="damage")
        path.write_bytes(damaged)
        event(_prepare_cleanly("listops", src, path, line=True))


REVIEWS = sorted(p.relative_to(FIXTURES / "text") for p in (FIXTURES / "text").rglob("*.txt"))


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(review=st.sampled_from(REVIEWS), tree=st.sampled_from(["file", "file", "file", "directory named .txt",
                                                              "label folder removed", "split emptied"]),
       data=st.data())
def test_aclimdb_tree(review, tree, data):
    """Reviews are bytes (a review in another encoding is read as its bytes, docs/data.md); an empty review, a
    folder where a review should be and a missing label folder are errors."""
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(FIXTURES / "text", Path(tmp) / "src")
        path, named = src / review, src / review
        if tree == "file":
            damaged = data.draw(damaged_bytes(path.read_bytes()), label="damage")
            path.write_bytes(damaged)
        elif tree == "directory named .txt":  # not a review: left out
            path.unlink()
            path.mkdir()
        elif tree == "label folder removed":
            shutil.rmtree(path.parent)
            named = src
        else:
            for other in path.parent.parent.glob("*/*.txt"):
                other.unlink()
            named = src
        event(tree)
        event(_prepare_cleanly("text", src, named, line=False))


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(file=st.sampled_from(["new_aan_pairs.train.tsv", "new_aan_pairs.eval.tsv", "new_aan_pairs.test.tsv"]),
       decode=st.booleans(), data=st.data())
def test_aan_tsv(file, decode, data):
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(FIXTURES / "retrieval", Path(tmp) / "src")
        path = src / "tsv_data" / file
        damaged = data.draw(damaged_lines(path.read_bytes(), b"\t"), label="damage")
        path.write_bytes(damaged)
        event(_prepare_cleanly("retrieval", src, path, line=True, decode=decode))


CIFAR = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(batch=st.sampled_from(CIFAR), data=st.data())
def test_cifar_python_batches(batch, data):
    """Pickles, damaged anywhere: the restricted unpickler's every failure is a DataError naming the batch."""
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(FIXTURES / "image", Path(tmp) / "src")
        path = src / "cifar-10-batches-py" / batch
        damaged = data.draw(damaged_bytes(path.read_bytes()), label="damage")
        path.write_bytes(damaged)
        event(_prepare_cleanly("image", src, path, line=False))


@pytest.fixture(scope="module")
def cifar_bin(tmp_path_factory):
    return cifar_binary(tmp_path_factory.mktemp("cifar"))


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(batch=st.sampled_from(CIFAR), data=st.data())
def test_cifar_binary_batches(cifar_bin, batch, data):
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(cifar_bin, Path(tmp) / "src" / "cifar-10-batches-bin").parent
        path = src / "cifar-10-batches-bin" / f"{batch}.bin"
        damaged = data.draw(damaged_bytes(path.read_bytes()), label="damage")
        path.write_bytes(damaged)
        event(_prepare_cleanly("image", src, path, line=False))


HARD = Path("pathfinder32") / "curv_contour_length_14"
PATHFINDER = sorted(p.relative_to(FIXTURES / "pathfinder") for p in (FIXTURES / "pathfinder").rglob("*")
                    if p.is_file())


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(file=st.sampled_from(PATHFINDER), data=st.data())
def test_pathfinder_metadata_and_pngs(file, data):
    """Metadata lines (space-separated) and PNGs; a zero-byte PNG is skipped and listed (documented)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = _copy(FIXTURES / "pathfinder", Path(tmp) / "src")
        path = src / file
        raw = path.read_bytes()
        if path.suffix == ".npy":
            damaged = data.draw(damaged_lines(raw, b" "), label="damage")
        else:
            damaged = data.draw(damaged_bytes(raw), label="damage")
        path.write_bytes(damaged)
        outcome = _prepare_cleanly("pathfinder", src, path, line=path.suffix == ".npy")
        if outcome == "ok" and path.suffix == ".png" and not damaged:
            assert (path.relative_to(src / HARD).as_posix() in
                    read_manifest(src.parent / "cache" / "pathfinder")["skipped_empty_files"])
        event(outcome)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """DIR/<class>/ with PNG (RGB, gray, palette) and JPEG images, as ImageFolder reads them."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / c / "a.png")
        Image.fromarray(pixels).save(root / c / "b.jpg", quality=90)
        Image.fromarray(pixels[..., 0]).save(root / c / "c.png")
        Image.fromarray(pixels).convert("P").save(root / c / "d.png")
    return root


@pytest.mark.slow  # 40 prepares of a fixture: seconds
@SETTINGS
@given(image=st.sampled_from([f"{c}/{n}" for c in ("cat", "dog") for n in ("a.png", "b.jpg", "c.png", "d.png")]),
       data=st.data())
def test_image_folder(image_folder, image, data):
    """Every item decodes to a (3, 16, 16) tensor, or raises a ValueError naming the damaged image."""
    from lra_soft.imagenet.data import ImageFolder
    from lra_soft.imagenet.transforms import eval_transform
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(image_folder, Path(tmp) / "train")
        path = root / image
        damaged = data.draw(damaged_bytes(path.read_bytes()), label="damage")
        path.write_bytes(damaged)
        folder = ImageFolder(root, eval_transform(16))
        outcome = "ok"
        for i, (sample, _) in enumerate(folder.samples):
            try:
                x, _ = folder[i]
            except ValueError as e:
                assert sample == path and str(path) in str(e).splitlines()[0], e
                outcome = "error"
                continue
            assert x.shape == (3, 16, 16) and bool(x.isfinite().all())
        event(outcome)


# --------------------------------------------------------------------------------------------------- holes found

def _damage_aan(tmp_path, field: int, value: bytes) -> Path:
    src = _copy(FIXTURES / "retrieval", tmp_path / "src")
    path = src / "tsv_data" / "new_aan_pairs.eval.tsv"
    lines = path.read_bytes().split(b"\n")
    fields = lines[2].split(b"\t")
    fields[field] = value
    lines[2] = b"\t".join(fields)
    path.write_bytes(b"\n".join(lines))
    return path


@pytest.mark.parametrize("field, value, decode, message", [
    (0, b"inf", False, "label b'inf' is not a number"),                     # was an OverflowError
    (3, b"{[]: 1}", True, "decode=true needs texts that are Python bytes literals"),  # was a TypeError
    (4, b"", False, "text2 is empty"),                                       # was an empty sequence in the cache
    (3, b"b''", True, "text1 is empty once decoded"),
], ids=["inf label", "unhashable literal", "empty text", "empty literal"])
def test_aan_holes(tmp_path, field, value, decode, message):
    path = _damage_aan(tmp_path, field, value)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: {message}")):
        tasks.prepare("retrieval", path.parent.parent, tmp_path / "cache", progress=False, decode=decode)


def test_empty_files_name_the_file(tmp_path):
    """Was: 'empty split(s) ... read from <folder>' (ListOps, AAN) or an empty review in the cache (aclImdb)."""
    cases = [("listops", "listops", "basic_val.tsv", "no examples"),
             ("retrieval", "retrieval", "tsv_data/new_aan_pairs.test.tsv", "no examples"),
             ("text", "text", "aclImdb/train/pos/3_9.txt", "empty review"),
             ("pathfinder", "pathfinder", f"{HARD}/metadata/2.npy", "empty metadata file")]
    for name, fixture, file, message in cases:
        src = _copy(FIXTURES / fixture, tmp_path / name)
        (src / file).write_bytes(b" \n" if name == "text" else b"")
        with pytest.raises(DataError, match=re.escape(f"{src / file}: {message}")):
            tasks.prepare(name, src, tmp_path / "cache", progress=False)
        assert not (tmp_path / "cache" / name).exists()


def test_folders_named_like_files_are_not_read(tmp_path):
    """Was an IsADirectoryError: a folder named <id>_<rating>.txt or data_batch_N is not a review or a batch."""
    text = _copy(FIXTURES / "text", tmp_path / "text")
    (text / "aclImdb" / "test" / "neg" / "99_1.txt").mkdir()
    assert read_manifest(tasks.prepare("text", text, tmp_path / "cache", progress=False))["counts"]["test"] == 20
    image = _copy(FIXTURES / "image", tmp_path / "image")
    (image / "cifar-10-batches-py" / "data_batch_6").mkdir()
    assert read_manifest(tasks.prepare("image", image, tmp_path / "cache", progress=False))["counts"]["test"] == 16


def test_cifar_pickle_holes(tmp_path):
    """A memo index of 2**31 made the unpickler raise MemoryError; labels that are not ints passed as floats."""
    import pickle
    src = _copy(FIXTURES / "image", tmp_path / "src")
    batch = src / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"\x80\x02K\x01r\xff\xff\xff\x7f.")
    with pytest.raises(DataError, match=re.escape(f"{batch}: not a CIFAR-10 python batch (MemoryError")):
        tasks.prepare("image", src, tmp_path / "cache", progress=False)
    good = pickle.loads((FIXTURES / "image" / "cifar-10-batches-py" / "data_batch_2").read_bytes(), encoding="bytes")
    good[b"labels"][3] = 2.5
    batch.write_bytes(pickle.dumps(good, protocol=2))
    with pytest.raises(DataError, match=re.escape(f"{batch}: 'labels' must be a list of 16 ints")):
        tasks.prepare("image", src, tmp_path / "cache", progress=False)


def test_pathfinder_image_outside_the_dataset_is_refused(tmp_path):
    src = _copy(FIXTURES / "pathfinder", tmp_path / "src")
    (tmp_path / "elsewhere.png").write_bytes((src / HARD / "imgs" / "0" / "sample_1.png").read_bytes())
    meta = src / HARD / "metadata" / "0.npy"
    lines = meta.read_text().splitlines()
    lines[1] = "../../.. elsewhere.png 1 1 1.8 14 14 5 1.5 4 1"
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{meta}:2: image ") + ".*lies outside"):
        tasks.prepare("pathfinder", src, tmp_path / "cache", progress=False)


def test_image_folder_decoder_failures_are_one_value_error(image_folder, tmp_path):
    """Was an OSError for some damage and other types (SyntaxError, ...) for the rest."""
    from lra_soft.imagenet.data import ImageFolder
    from lra_soft.imagenet.transforms import eval_transform
    root = _copy(image_folder, tmp_path / "train")
    (root / "cat" / "a.png").write_bytes(b"")
    (root / "dog" / "a.png").write_bytes((image_folder / "dog" / "a.png").read_bytes()[:60])
    folder = ImageFolder(root, eval_transform(16))
    for path in (root / "cat" / "a.png", root / "dog" / "a.png"):
        with pytest.raises(ValueError, match=re.escape(f"{path}: cannot decode this image")):
            folder[[p for p, _ in folder.samples].index(path)]
