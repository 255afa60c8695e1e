"""Text (byte-level IMDb): aclImdb folders, local parquet, hub and tfds sources, the two validation choices."""
import time

import numpy as np
import pytest

import tasks
from tasks import text
from tasks._common import DataError, read_manifest
from tasks.fixtures import aclimdb, imdb_parquet


def tokens(cache, split):
    ds = tasks.load("text", cache, split)
    return [(ds[i]["input_ids"].tolist(), ds[i]["label"].item()) for i in range(len(ds))]


def test_aclimdb_bytes_plus_one_and_seeded_validation_split(tmp_path):
    """docs/pitfalls.md, #9: IMDb has no val split; by default a seeded 10% of train, disjoint from the rest."""
    acl = aclimdb(tmp_path / "src")
    cache = tasks.prepare("text", tmp_path / "src", tmp_path / "c", progress=False)
    m = read_manifest(cache)
    assert m["counts"] == {"train": 72, "val": 8, "test": 20}
    assert m["vocab_size"] == 257 and m["max_len"] == 4096 and m["options"]["max_length"] == 4000
    assert [s["files"] for s in m["sources"]] == [80, 20]
    train, val = tokens(cache, "train"), tokens(cache, "val")
    assert not {tuple(t) for t, _ in train} & {tuple(t) for t, _ in val}
    review = next((acl / "test" / "neg").glob("0_*.txt"))
    first = tokens(cache, "test")[0]
    assert first == (list(np.frombuffer(review.read_bytes().strip(), np.uint8) + 1), 0)  # tfds strips, id = byte+1
    assert review.read_bytes().endswith(b"!\n") and 0 not in first[0]
    assert any("café".encode() in p.read_bytes() for p in acl.rglob("*.txt"))
    again = tasks.prepare("text", acl, tmp_path / "c2", progress=False)
    assert tokens(again, "val") == val  # same seed, same carve-out; the aclImdb folder itself is accepted too
    other = tasks.prepare("text", acl, tmp_path / "c3", progress=False, seed=1)
    assert tokens(other, "val") != val


def test_lra_test_as_validation_and_explicit_length(tmp_path):
    """docs/pitfalls.md, #8, #9: LRA's choice (val = test) and its 1000-byte length are options, not silent defaults."""
    aclimdb(tmp_path / "src")
    cache = tasks.prepare("text", tmp_path / "src", tmp_path / "c", progress=False, val="test", max_length=100)
    m = read_manifest(cache)
    assert m["counts"] == {"train": 80, "val": 20, "test": 20} and m["max_len"] == 128 and m["longest"] == 100
    assert tokens(cache, "val") == tokens(cache, "test")
    with pytest.raises(DataError, match="must be 'split'"):
        tasks.prepare("text", tmp_path / "src", tmp_path / "c", val="dev")


def test_local_parquet_equals_aclimdb(tmp_path):
    """The hub's parquet layout (plain_text/{train,test}-*.parquet, text + label) reads to the same tokens."""
    aclimdb(tmp_path / "acl")
    from_acl = tasks.prepare("text", tmp_path / "acl", tmp_path / "c1", progress=False)
    parquet = imdb_parquet(tmp_path / "pq")
    from_pq = tasks.prepare("text", parquet, tmp_path / "c2", progress=False)
    for split in ("train", "val", "test"):
        assert tokens(from_pq, split) == tokens(from_acl, split)
    m = read_manifest(from_pq)
    assert [s["path"] for s in m["sources"]] == ["plain_text/train-00000-of-00001.parquet",
                                                 "plain_text/test-00000-of-00001.parquet"]


def test_hub_without_network_fails_within_seconds(tmp_path, monkeypatch):
    """No network: the hub source fails in seconds with what to do (docs/pitfalls.md, #1)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match="could not load stanfordnlp/imdb .*HF_HUB_OFFLINE is set.*plain_text"):
        tasks.prepare("text", "hf:stanfordnlp/imdb", tmp_path / "c", progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port stands in for "no network"
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub at http://127.0.0.1:9"):
        tasks.prepare("text", "hf:stanfordnlp/imdb", tmp_path / "c", progress=False)
    assert time.monotonic() - start < 20
    assert not (tmp_path / "c").exists()


def test_errors_missing_source_empty_split_bad_label(tmp_path):
    """Missing source, empty split, label out of range, missing parquet split (docs/pitfalls.md, #9, #1)."""
    with pytest.raises(DataError, match="needs --source"):
        tasks.prepare("text", None, tmp_path / "c")
    with pytest.raises(DataError, match=r"(?s)no recognised data layout .*aclImdb/ with train/\{pos,neg\}"):
        tasks.prepare("text", tmp_path, tmp_path / "c")
    acl = aclimdb(tmp_path / "src")
    for p in (acl / "test").rglob("*.txt"):
        p.unlink()
    with pytest.raises(DataError, match=r"empty split\(s\) \['test'\]"):
        tasks.prepare("text", acl, tmp_path / "c", progress=False)
    import datasets
    folder = tmp_path / "pq"
    folder.mkdir()
    for split, label in (("train", 2), ("test", 0)):
        rows = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [label, 0]})
        rows.to_parquet(str(folder / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"split 'train' has label\(s\) \[2\] outside 0 \(neg\) / 1 \(pos\)"):
        tasks.prepare("text", folder, tmp_path / "c", progress=False)
    (folder / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"no parquet file for split\(s\) \['test'\]"):
        tasks.prepare("text", folder, tmp_path / "c", progress=False)


def test_encode_is_bytetextencoder():
    """Byte ids are UTF-8 byte + 1, as tfds' ByteTextEncoder (docs/pitfalls.md, #8: length explicit)."""
    assert text.encode("é<br />", 100).tolist() == [0xC3 + 1, 0xA9 + 1, *[b + 1 for b in b"<br />"]]
    assert text.encode(b"abcdef", 3).tolist() == [98, 99, 100]


def test_save_to_disk_folder_equals_aclimdb(tmp_path):
    """A `datasets.DatasetDict.save_to_disk` folder (arrow files) reads to the aclImdb tokens (docs/pitfalls.md, #1)."""
    import datasets
    aclimdb(tmp_path / "acl")
    from_acl = tasks.prepare("text", tmp_path / "acl", tmp_path / "c1", progress=False, val="test")
    rows = {split: [(p.read_text(encoding="utf-8").strip(), label) for p, label in text._acl_files(
        tmp_path / "acl" / "aclImdb", split)] for split in ("train", "test")}
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": [t for t, _ in r], "label": [y for _, y in r]})
                          for split, r in rows.items()}).save_to_disk(str(tmp_path / "saved"))
    from_disk = tasks.prepare("text", tmp_path / "saved", tmp_path / "c2", progress=False, val="test")
    for split in ("train", "val", "test"):
        assert tokens(from_disk, split) == tokens(from_acl, split)
    assert any(s["path"] == "dataset_dict.json" for s in read_manifest(from_disk)["sources"])
