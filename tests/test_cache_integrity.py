"""Cache integrity: every array is checked against the size and sha256 in manifest.json when a cache is opened; a
corrupt cache is rebuilt by prepare (the source is there) or refused by load naming the file; a dataset keeps
reading the cache it opened even when it is rebuilt under it."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tasks
from tasks import _common
from tasks._common import CorruptCache, DataError, read_manifest
from tasks.fixtures import aan_tsv, listops_tsv

SMALL = dict(num_train=24, num_val=8, num_test=8, min_length=10, max_length=60, generator=1)  # generated in ~0.1 s


@pytest.fixture(autouse=True)
def _new_process(monkeypatch):
    """Each test starts as a new process would: nothing verified yet."""
    monkeypatch.setattr(_common, "_VERIFIED", set())


def _prepared(tmp_path):
    src = listops_tsv(tmp_path / "src")
    return src, tasks.prepare("listops", src, tmp_path / "data", progress=False)


def _flip(path: Path, at: int = -1) -> None:
    """Flip one bit in place, keeping the size and the modification time (what stat-based checks cannot see)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _arrays(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*.npy"))}


def test_manifest_records_every_array(tmp_path):
    _, cache = _prepared(tmp_path)
    records = read_manifest(cache)["arrays"]
    assert sorted(records) == sorted(p.name for p in cache.glob("*.npy")) and len(records) == 9
    for name, record in records.items():
        assert record == {"size": (cache / name).stat().st_size, "sha256": _common.sha256_file(cache / name)}
    pair = tasks.prepare("retrieval", aan_tsv(tmp_path / "aan"), tmp_path / "data", progress=False)
    assert {"train.tokens2.npy", "train.offsets2.npy"} <= set(read_manifest(pair)["arrays"])


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-3]), "train.tokens.npy",
                  r"train\.tokens\.npy: \d+ bytes, but its header announces"),
    "flipped byte": (_flip, "train.tokens.npy", r"train\.tokens\.npy: its bytes differ from the size and sha256"),
    "flipped header": (lambda p: _flip(p, 20), "val.labels.npy", r"val\.labels\.npy: "),
    "missing": (lambda p: p.unlink(), "test.offsets.npy", r"test\.offsets\.npy: missing"),
    "emptied": (lambda p: p.write_bytes(b""), "train.labels.npy", r"train\.labels\.npy: empty file"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_array_is_refused_by_load_and_rebuilt_by_prepare(tmp_path, kind, capsys):
    src, cache = _prepared(tmp_path)
    good = _arrays(cache)
    damage, name, message = CORRUPTIONS[kind]
    damage(cache / name)
    split = name.split(".")[0]
    with pytest.raises(CorruptCache, match=message) as error:
        tasks.load("listops", cache, split)
    text = str(error.value)
    assert "\n" not in text and str(cache / name) in text and "python cli.py prepare listops" in text
    assert tasks.prepare("listops", src, tmp_path / "data", progress=False) == cache
    assert f"rebuilding the cache from its source: {cache / name}" in capsys.readouterr().err
    assert _arrays(cache) == good  # the same bytes as the first build
    assert len(tasks.load("listops", cache, split)) == read_manifest(cache)["counts"][split]


def test_manifest_that_does_not_match_its_arrays_is_refused(tmp_path):
    _, cache = _prepared(tmp_path)
    manifest = read_manifest(cache)
    manifest["arrays"]["test.labels.npy"]["sha256"] = "0" * 64
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCache, match=r"test\.labels\.npy: its bytes differ"):
        tasks.load("listops", cache, "test")
    del manifest["arrays"]["test.labels.npy"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCache, match=r"test\.labels\.npy: not listed in the manifest\.json"):
        tasks.load("listops", cache, "test")
    tasks.load("listops", cache, "train")  # the other splits still open


def test_generated_cache_is_rebuilt_from_the_generator(tmp_path, capsys):
    """No --source: the 'source' of generated ListOps is the seeded generator, so a corrupt cache is regenerated."""
    cache = tasks.prepare("listops", None, tmp_path, progress=False, **SMALL)
    good = _arrays(cache)
    _flip(cache / "val.tokens.npy")
    tasks.prepare("listops", None, tmp_path, progress=False, **SMALL)
    assert "rebuilding the cache from its source" in capsys.readouterr().err and _arrays(cache) == good


def test_each_array_is_hashed_once_per_process(tmp_path, monkeypatch):
    src, cache = _prepared(tmp_path)
    hashed = []
    real = _common.verify_mapped

    def counting(path, *args):
        before = len(_common._VERIFIED)
        real(path, *args)
        hashed.extend([Path(path).name] * (len(_common._VERIFIED) - before))

    monkeypatch.setattr(_common, "verify_mapped", counting)
    tasks.prepare("listops", src, tmp_path / "data", progress=False)
    for split in ("train", "val", "test"):
        tasks.load("listops", cache, split)
    assert sorted(hashed) == sorted(read_manifest(cache)["arrays"])


def test_cache_without_array_records_gets_them_after_a_consistency_check(tmp_path):
    """A cache written before arrays were recorded is adopted once (not rebuilt); a damaged one is rebuilt."""
    src, cache = _prepared(tmp_path)
    manifest = read_manifest(cache)
    records = manifest.pop("arrays")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    stamp = (cache / "train.tokens.npy").stat().st_mtime_ns
    tasks.prepare("listops", src, tmp_path / "data", progress=False)
    assert read_manifest(cache)["arrays"] == records and (cache / "train.tokens.npy").stat().st_mtime_ns == stamp
    (cache / "manifest.json").write_text(json.dumps(manifest))
    offsets = cache / "train.offsets.npy"
    array = np.load(offsets)
    array[-1] += 1  # offsets that overrun the tokens: consistent .npy files, inconsistent cache
    np.save(offsets, array)
    with pytest.raises(CorruptCache, match=r"train\.\*\.npy: tokens, offsets and labels do not fit together"):
        tasks.load("listops", cache, "train")
    tasks.prepare("listops", src, tmp_path / "data", progress=False)
    assert read_manifest(cache)["arrays"] == records


def test_dataset_pins_the_cache_it_opened(tmp_path):
    """A cache rebuilt under a running job: the open dataset keeps reading the old arrays, all of them (labels and
    tokens alike); a copy made for a DataLoader worker afterwards fails loudly instead of mixing the two."""
    src, cache = _prepared(tmp_path)
    ref = tasks.load("listops", cache, "train")
    before = [(ref[i]["input_ids"].tolist(), int(ref[i]["label"])) for i in range(len(ref))]
    ds = tasks.load("listops", cache, "train")  # opened, not read yet: nothing of it is read before the rebuild
    clone = pickle.loads(pickle.dumps(ds))  # before the rebuild: the same files, fine
    assert [clone[i]["input_ids"].tolist() for i in range(3)] == [b[0] for b in before[:3]]
    train = src / "basic_train.tsv"
    header, *rows, end = train.read_bytes().split(b"\r\n")
    train.write_bytes(b"\r\n".join([header, *rows[-2::-1], end]))  # other order, one row fewer
    tasks.prepare("listops", src, tmp_path / "data", progress=False)
    assert read_manifest(cache)["counts"]["train"] == len(ds) - 1
    assert [(ds[i]["input_ids"].tolist(), int(ds[i]["label"])) for i in range(len(ds))] == before
    with pytest.raises(DataError, match=re.escape(f"{cache / 'train.labels.npy'}: the cache was rebuilt after this "
                                                  "dataset opened it")):
        pickle.loads(pickle.dumps(ds))
    assert len(tasks.load("listops", cache, "train")) == len(ds) - 1


def test_cli_prepare_rebuilds_and_a_load_refusal_is_one_line(tmp_path):
    from cli import app
    src, cache = _prepared(tmp_path)
    _flip(cache / "test.tokens.npy")
    result = CliRunner().invoke(app, ["prepare", "listops", "--source", str(src), "--data-dir", str(tmp_path / "data"),
                                      "--no-progress"])
    assert result.exit_code == 0 and "rebuilding the cache from its source" in result.output, result.output
    _common._VERIFIED.clear()
    _flip(cache / "test.tokens.npy")
    with pytest.raises(CorruptCache) as error:
        tasks.load("listops", cache, "test")
    assert len(str(error.value).splitlines()) == 1
