"""Image (grayscale CIFAR-10): python and binary batches, parquet, restricted unpickling, grayscale, pixel offset."""
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

import tasks
from tasks import image
from tasks._common import DataError, read_manifest
from tasks.fixtures import cifar_batches, cifar_binary, cifar_parquet, cifar_python


def all_tokens(cache):
    out = {}
    for split in ("train", "val", "test"):
        ds = tasks.load("image", cache, split)
        out[split] = [(ds[i]["input_ids"].tolist(), ds[i]["label"].item()) for i in range(len(ds))]
    return out


def test_python_and_binary_batches_agree_with_official_split(tmp_path):
    """Official split train[:90%] / train[90%:] / test, in source order (docs/pitfalls.md, #3: raw files)."""
    cifar_python(tmp_path / "py")
    cifar_binary(tmp_path / "bin")
    a = tasks.prepare("image", tmp_path / "py", tmp_path / "ca", progress=False)
    b = tasks.prepare("image", tmp_path / "bin" / "cifar-10-batches-bin", tmp_path / "cb", progress=False)
    assert read_manifest(a)["counts"] == read_manifest(b)["counts"] == {"train": 72, "val": 8, "test": 16}
    ta, tb = all_tokens(a), all_tokens(b)
    assert ta == tb
    batches = cifar_batches()
    rgb = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    expected = image.to_grayscale(rgb[72], "tf").reshape(-1).astype(np.int64) + 1  # row-major, id = pixel + 1
    assert ta["val"][0] == (expected.tolist(), int(labels[72]))
    assert len(ta["train"][0][0]) == 1024 and read_manifest(a)["vocab_size"] == 257


def test_grayscale_formulas():
    """docs/pitfalls.md, #11: 'pil' is PIL's convert('L') exactly; 'tf' (LRA) is equal or one level below it."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    np.testing.assert_array_equal(image.to_grayscale(rgb, "pil"), pil)
    diff = pil.astype(int) - image.to_grayscale(rgb, "tf").astype(int)
    assert set(np.unique(diff)) <= {0, 1} and 0.1 < diff.mean() < 0.5
    corners = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    # tf: floor(w . rgb / 255 * 255.5) in float32
    assert image.to_grayscale(corners, "tf").tolist() == [0, 255, 76, 149, 29]
    with pytest.raises(DataError, match="must be 'tf' or 'pil'"):
        image.to_grayscale(corners, "luma")


def test_pixel_offset_keeps_black_off_padding(tmp_path):
    """docs/pitfalls.md, #5: black pixels get id 1 by default; pixel_offset=0 gives the reference ids (vocab 256)."""
    cifar_binary(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    records = np.fromfile(path, np.uint8).reshape(-1, 3073)
    records[0, 1:] = 0  # an all-black image
    records.tofile(path)
    cache = tasks.prepare("image", tmp_path, tmp_path / "c", progress=False)
    assert tasks.load("image", cache, "test")[0]["input_ids"].unique().tolist() == [1]
    compat = tasks.prepare("image", tmp_path, tmp_path / "c0", progress=False, pixel_offset=0, grayscale="pil")
    m = read_manifest(compat)
    assert m["vocab_size"] == 256 and m["vocab"][0] == "px0" and m["grayscale"] == "pil"
    assert tasks.load("image", compat, "test")[0]["input_ids"].unique().tolist() == [0]


def test_malicious_pickle_is_refused(tmp_path):
    """A pickle that reduces to os.system must not run: the restricted unpickler only builds numpy arrays."""
    root = cifar_python(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 python batch .*global posix.system is not "
                                        r"allowed"):
        tasks.prepare("image", tmp_path, tmp_path / "c", progress=False)
    assert not marker.exists()
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="'data' must be a uint8 array of shape"):
        tasks.prepare("image", tmp_path, tmp_path / "c", progress=False)


def test_binary_truncated_and_label_out_of_range(tmp_path):
    """Truncated binary batches and labels outside 0..9 name the file (docs/pitfalls.md, #4)."""
    root = cifar_binary(tmp_path)
    path = root / "data_batch_2.bin"
    data = bytearray(path.read_bytes())
    data[3073] = 10  # label byte of the second image
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"data_batch_2.bin: label 10 of image 1 out of range 0..9"):
        tasks.prepare("image", tmp_path, tmp_path / "c", progress=False)
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(DataError, match="is not a positive multiple of 3073 bytes"):
        tasks.prepare("image", tmp_path, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"(?s)no recognised data layout.*cifar-10-batches-py/"):
        tasks.prepare("image", tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin", tmp_path / "c2", progress=False)


def test_parquet_matches_batches_and_hub_fails_fast_offline(tmp_path, monkeypatch):
    """Hub-layout parquet reads to the same tokens; the hub fails within seconds offline (docs/pitfalls.md, #1)."""
    cifar_python(tmp_path / "py")
    a = tasks.prepare("image", tmp_path / "py", tmp_path / "ca", progress=False)
    pq = cifar_parquet(tmp_path / "pq")
    b = tasks.prepare("image", pq, tmp_path / "cb", progress=False)
    assert all_tokens(a) == all_tokens(b)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub.*uoft-cs/cifar10"):
        tasks.prepare("image", "hf:uoft-cs/cifar10", tmp_path / "c", progress=False)
    assert time.monotonic() - start < 10
