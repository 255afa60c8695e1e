"""Pathfinder: PNG tree with text metadata, empty PNGs skipped, seeded 80/10/10 split written to disk."""
import json

import numpy as np
import pytest
from PIL import Image

import tasks
from tasks import pathfinder
from tasks._common import DataError, read_manifest
from tasks.fixtures import pathfinder_tree

HARD = "pathfinder32/curv_contour_length_14"


def test_reads_tree_skips_empty_png_and_writes_split(tmp_path):
    """docs/pitfalls.md, #12 (zero-byte PNG), #13 (metadata .npy is text), #3 (seeded split on disk)."""
    pathfinder_tree(tmp_path / "lra_release" / "lra_release")
    cache = tasks.prepare("pathfinder", tmp_path, tmp_path / "c", progress=False)
    m = read_manifest(cache)
    assert m["counts"] == {"train": 64, "val": 8, "test": 8}
    assert m["skipped_empty"] == 1 and m["skipped_empty_files"] == ["imgs/0/sample_5.png"]
    assert m["max_len"] == 1024 and m["vocab_size"] == 257
    assert [s["path"] for s in m["sources"]] == ["metadata/0.npy", "metadata/2.npy", "metadata/10.npy",
                                                 "imgs/*/*.png"]  # numeric order, as S4 sorts
    split = json.loads((cache / "split.json").read_text())
    assert split["seed"] == 0 and len(split["train"]) == 64 and "imgs/0/sample_5.png" not in sum(
        (split[s] for s in ("train", "val", "test")), [])
    root = tmp_path / "lra_release" / "lra_release" / HARD
    item = tasks.load("pathfinder", cache, "val")[0]
    pixels = np.asarray(Image.open(root / split["val"][0])).reshape(-1).astype(np.int64)
    assert item["input_ids"].tolist() == (pixels + 1).tolist()  # docs/pitfalls.md, #5: background 0 -> id 1
    meta = {f"{f[0]}/{f[1]}": int(f[3]) for b in ("0", "2", "10")
            for f in map(str.split, (root / "metadata" / f"{b}.npy").read_text().splitlines())}
    for name in ("train", "val", "test"):
        ds = tasks.load("pathfinder", cache, name)
        assert [ds[i]["label"].item() for i in range(len(ds))] == [meta[p] for p in split[name]]
    assert set(meta.values()) == {0, 1}


def test_split_is_seeded(tmp_path):
    """The same seed gives the same split, another seed another one (docs/pitfalls.md, #3)."""
    pathfinder_tree(tmp_path)
    a = json.loads((tasks.prepare("pathfinder", tmp_path, tmp_path / "a", progress=False) / "split.json").read_text())
    b = json.loads((tasks.prepare("pathfinder", tmp_path, tmp_path / "b", progress=False) / "split.json").read_text())
    c = json.loads((tasks.prepare("pathfinder", tmp_path, tmp_path / "c", progress=False, seed=1) /
                    "split.json").read_text())
    assert a == b and a["val"] != c["val"]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(c["train"] + c["val"] + c["test"])


def test_layouts_difficulty_and_resolution(tmp_path):
    """The difficulty folder itself, S4's pathfinder/ folder and Path-X-style resolutions are found."""
    pathfinder_tree(tmp_path / "pathfinder", difficulty="curv_baseline", resolution=64, per_batch=20,
                    batches=("0",))
    cache = tasks.prepare("pathfinder", tmp_path, tmp_path / "c", progress=False, difficulty="curv_baseline",
                          resolution=64)
    m = read_manifest(cache)
    assert m["max_len"] == 4096 and m["counts"] == {"train": 15, "val": 2, "test": 2} and m["image_shape"] == [64, 64]
    direct = tasks.prepare("pathfinder", tmp_path / "pathfinder" / "pathfinder64" / "curv_baseline", tmp_path / "d",
                           progress=False, resolution=64)
    assert read_manifest(direct)["counts"] == m["counts"]
    with pytest.raises(DataError, match=r"(?s)no pathfinder32/curv_contour_length_14 folder.*pathfinder\{32,64"):
        tasks.prepare("pathfinder", tmp_path, tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="is 64x64, expected 32x32: check the resolution option"):
        tasks.prepare("pathfinder", tmp_path / "pathfinder" / "pathfinder64" / "curv_baseline", tmp_path / "e",
                      progress=False)
    with pytest.raises(DataError, match="resolution must be one of 32, 64, 128, 256"):
        tasks.prepare("pathfinder", tmp_path, tmp_path / "e", resolution=48)


@pytest.mark.parametrize("problem, message", [
    ("garbage", "unreadable image .*imgs/2/sample_3.png \\(listed at .*metadata/2.npy:4\\)"),
    ("missing", "metadata/2.npy:4: image .*imgs/2/sample_3.png listed in the metadata does not exist"),
    ("label", "metadata/2.npy:4: label 3 out of range \\(0 or 1\\)"),
    ("short", "metadata/2.npy:4: expected at least 4 space-separated fields"),
])
def test_errors_name_the_image_or_metadata_line(tmp_path, problem, message):
    """Unreadable or missing images and bad metadata lines name the file and line (docs/pitfalls.md, #12, #13)."""
    pathfinder_tree(tmp_path)
    root = tmp_path / HARD
    png, meta = root / "imgs" / "2" / "sample_3.png", root / "metadata" / "2.npy"
    lines = meta.read_text().splitlines()
    if problem == "garbage":
        png.write_bytes(b"\x89PNG not really")
    elif problem == "missing":
        png.unlink()
    elif problem == "label":
        fields = lines[3].split()
        lines[3] = " ".join(fields[:3] + ["3"] + fields[4:])
    else:
        lines[3] = "imgs/2 sample_3.png"
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        tasks.prepare("pathfinder", tmp_path, tmp_path / "c", progress=False)
    # no cache, nothing but the empty lock file of the cache
    assert not (tmp_path / "c").exists() or [p.name for p in (tmp_path / "c").iterdir()] == [".pathfinder.lock"]


def test_empty_split_and_no_metadata(tmp_path):
    """Too few images for a split, or no metadata, fail clearly (docs/pitfalls.md, #13)."""
    pathfinder_tree(tmp_path, batches=("0",), per_batch=3, empty=("0", 0))
    with pytest.raises(DataError, match=r"empty split\(s\) \['val', 'test'\]"):
        tasks.prepare("pathfinder", tmp_path, tmp_path / "c", progress=False)
    for p in (tmp_path / HARD / "metadata").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no metadata/\\*.npy files"):
        pathfinder.prepare(tmp_path, tmp_path / "c", progress=False)
