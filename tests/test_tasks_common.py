"""Shared data-layer behaviour: the task registry, manifests, stale-cache rebuilds, atomic prepare, collate, CLI."""
import json
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tasks
from tasks import _common, listops
from tasks._common import DataError, collate, read_manifest
from tasks.fixtures import aan_tsv, listops_tsv

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "data" / "fixtures"


def test_registry_matches_names_and_module_contract():
    """Every task module exposes the contract; MODEL lengths are the harness's powers of two (docs/pitfalls.md, #16)."""
    assert list(tasks.TASKS) == ["listops", "text", "retrieval", "image", "pathfinder"]
    assert set(typing.get_args(tasks.TaskName)) == set(tasks.TASKS)
    for name, module in tasks.TASKS.items():
        assert module.NAME == name and "(LRA, Tay et al. 2021)" in module.__doc__.strip().splitlines()[0]
        assert module.MODEL.max_len & (module.MODEL.max_len - 1) == 0  # a power of two, as the harness pads
        assert module.MODEL.vocab_size > 1 and module.TRAIN.steps > module.TRAIN.warmup
    assert tasks.retrieval.MODEL.pair and not tasks.text.MODEL.pair
    assert (tasks.text.MODEL.max_len, tasks.retrieval.MODEL.max_len, tasks.image.MODEL.max_len) == (4096, 4096, 1024)
    with pytest.raises(ValueError, match=r"unknown task 'listop'; choose from \['listops', 'text'"):
        tasks.get_task("listop")


def test_collate_pads_with_zero_and_masks():
    """Padding id 0 is masked out; fixed pad_to serves landmark/Linformer variants (docs/pitfalls.md, #5, #16)."""
    items = [{"input_ids": torch.tensor([3, 4, 5]), "label": torch.tensor(1)},
             {"input_ids": torch.tensor([7]), "label": torch.tensor(0)}]
    batch = collate(items)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[3, 4, 5], [7, 0, 0]]))
    torch.testing.assert_close(batch["mask"], torch.tensor([[True, True, True], [True, False, False]]))
    torch.testing.assert_close(batch["label"], torch.tensor([1, 0]))
    assert batch["input_ids"].dtype == torch.long and "input_ids2" not in batch
    fixed = collate(items, pad_to=8)
    assert fixed["input_ids"].shape == (2, 8) and fixed["mask"].sum().item() == 4
    with pytest.raises(ValueError, match="length 3 does not fit pad_to=2"):
        collate(items, pad_to=2)
    pairs = [{**item, "input_ids2": torch.tensor([9] * (i + 2))} for i, item in enumerate(items)]
    batch = collate(pairs)
    torch.testing.assert_close(batch["input_ids2"], torch.tensor([[9, 9, 0], [9, 9, 9]]))
    torch.testing.assert_close(batch["mask2"], batch["input_ids2"] != 0)


def test_manifest_keys_and_memory_mapped_arrays(tmp_path):
    """manifest.json has the agreed keys and source hashes; arrays open memory-mapped (docs/pitfalls.md, #2)."""
    cache = tasks.prepare("retrieval", aan_tsv(tmp_path), tmp_path / "cache", progress=False)
    m = read_manifest(cache)
    for key in ("task", "sources", "counts", "vocab", "vocab_size", "num_classes", "max_len", "tokenizer_version",
                "options"):
        assert key in m, key
    assert all({"path", "size", "sha256"} <= set(s) for s in m["sources"])
    assert m["sources"][0]["size"] == (tmp_path / "tsv_data" / "new_aan_pairs.train.tsv").stat().st_size
    tokens = np.load(cache / "train.tokens.npy", mmap_mode="r")
    offsets = np.load(cache / "train.offsets.npy", mmap_mode="r")
    assert isinstance(tokens, np.memmap) and offsets[-1] == len(tokens) and len(offsets) == m["counts"]["train"] + 1
    assert not list(cache.glob("*.raw")) and not list(tmp_path.glob(".cache*"))


def test_stale_cache_is_rebuilt_when_source_or_options_change(tmp_path):
    """A cache is reused only while source, options and tokenizer version match (docs/pitfalls.md, #2)."""
    src = listops_tsv(tmp_path / "src")
    cache = tasks.prepare("listops", src, tmp_path, progress=False)
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    assert tasks.prepare("listops", src, tmp_path, progress=False) == cache
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp  # same source: reused
    test = src / "basic_test.tsv"
    test.write_bytes(test.read_bytes() + b"( ( ( [MAX 3 ) 7 ) ] )\t7\r\n")
    tasks.prepare("listops", src, tmp_path, progress=False)
    assert read_manifest(cache)["counts"]["test"] == 9  # changed source: rebuilt
    aan = aan_tsv(tmp_path / "aan")
    first = tasks.prepare("retrieval", aan, tmp_path, progress=False)
    assert read_manifest(first)["longest"] > 50
    tasks.prepare("retrieval", aan, tmp_path, progress=False, max_length=50)
    assert read_manifest(first)["longest"] == 50 and read_manifest(first)["options"]["max_length"] == 50
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["tokenizer_version"] = "listops-0"  # an older tokenizer's cache
    (cache / "manifest.json").write_text(json.dumps(manifest))
    tasks.prepare("listops", src, tmp_path, progress=False)
    assert read_manifest(cache)["tokenizer_version"] == listops.TOKENIZER_VERSION


def test_interrupted_prepare_leaves_no_complete_looking_cache(tmp_path, monkeypatch):
    """An exception or Ctrl-C mid-build removes the partial build and keeps the previous cache untouched."""
    src = listops_tsv(tmp_path / "src")
    cache = tasks.prepare("listops", src, tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    calls = {"n": 0}
    real_add = _common.SplitWriter.add

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(_common.SplitWriter, "add", interrupted)
    test = src / "basic_test.tsv"
    test.write_bytes(test.read_bytes() + b"( ( ( [MAX 3 ) 7 ) ] )\t7\r\n")
    with pytest.raises(KeyboardInterrupt):
        tasks.prepare("listops", src, tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    # no temporary directory left; the empty lock file of the cache stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [".listops.lock", "listops", "src"]
    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        tasks.prepare("listops", src, fresh, progress=False)
    assert not (fresh / "listops").exists() and [p.name for p in fresh.iterdir()] == [".listops.lock"]
    monkeypatch.undo()
    assert read_manifest(tasks.prepare("listops", src, fresh, progress=False))["counts"]["test"] == 9


def test_load_errors_and_option_errors(tmp_path):
    """Missing caches, foreign caches, bad splits and unknown options fail with what to do."""
    with pytest.raises(FileNotFoundError, match="run `python cli.py prepare listops` first"):
        tasks.load("listops", tmp_path, "train")
    cache = tasks.prepare("retrieval", aan_tsv(tmp_path), tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="holds a cache of task 'retrieval', not 'listops'"):
        tasks.load("listops", cache, "train")
    with pytest.raises(ValueError, match=r"unknown split 'dev'; choose from \['train', 'val', 'test'\]"):
        tasks.load("retrieval", cache, "dev")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['max_len'\] for task 'retrieval'; valid options "
                                        r"\(with defaults\): max_length=4000, decode=False"):
        tasks.prepare("retrieval", tmp_path, tmp_path / "c", max_len=3)
    with pytest.raises(DataError, match="must be of type int"):
        tasks.prepare("retrieval", tmp_path, tmp_path / "c", max_length="long")
    with pytest.raises(FileNotFoundError, match="no readable manifest.json"):
        tasks.manifest(tmp_path / "nothing")
    assert tasks.manifest(cache) == read_manifest(cache)


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    """Datasets pickle into DataLoader workers and give every example of the split (docs/pitfalls.md, #15)."""
    import pickle
    cache = tasks.prepare("retrieval", aan_tsv(tmp_path), tmp_path / "c", progress=False)
    ds = tasks.load("retrieval", cache, "test")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    for key in ("input_ids", "input_ids2", "label"):
        torch.testing.assert_close(clone[3][key], ds[3][key])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    assert sum(len(b["label"]) for b in loader) == len(ds) == 8
    with pytest.raises(IndexError):
        ds[8]


def test_cli_prepare_every_committed_fixture(tmp_path):
    """`python cli.py prepare TASK --source data/fixtures/TASK` works for all five tasks; errors exit 1."""
    from cli import app
    runner = CliRunner()
    for task in tasks.TASKS:
        result = runner.invoke(app, ["prepare", task, "--source", str(FIXTURES / task), "--data-dir", str(tmp_path),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
        counts = read_manifest(tmp_path / task)["counts"]
        assert min(counts.values()) >= 8 and f"counts {counts}" in result.output
    result = runner.invoke(app, ["prepare", "image", "--source", str(tmp_path / "none"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "cifar-10-batches-py" in result.output
    result = runner.invoke(app, ["prepare", "retrieval", "--source", str(FIXTURES / "retrieval"), "--data-option",
                                     "decode=yes"])
    assert result.exit_code == 1 and "must be of type bool" in result.output
    result = runner.invoke(app, ["prepare", "listops", "--data-dir", str(tmp_path), "--data-option", "seed=None"])
    assert result.exit_code == 1 and "option seed=None of task 'listops' must be of type int" in result.output
    result = runner.invoke(app, ["prepare", "listops", "--data-dir", str(tmp_path), "--data-option", "seed"])
    assert result.exit_code == 1 and "--data-option: 'seed' is not of the form key=value" in result.output
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0 and "new_aan_pairs.train.tsv" in result.output and "metadata" in result.output


def test_committed_fixtures_equal_their_builders(tmp_path):
    """data/fixtures is exactly what tasks.fixtures writes (PNGs compared by pixels, their encoder may change)."""
    from PIL import Image

    from tasks.fixtures import build_all
    build_all(tmp_path)
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert built == committed
    for rel in built:
        a, b = tmp_path / rel, FIXTURES / rel
        if rel.suffix == ".png" and a.stat().st_size:
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_unchanged_sources_are_not_rehashed_and_touched_ones_are_checked(tmp_path, monkeypatch):
    """Reuse costs a stat per file; hashes are recomputed only when a size or mtime changed."""
    from tasks import pathfinder
    from tasks.fixtures import pathfinder_tree
    pathfinder_tree(tmp_path / "src")
    cache = tasks.prepare("pathfinder", tmp_path / "src", tmp_path, progress=False)
    built = read_manifest(cache)

    def no_hashing(*args, **kwargs):
        raise AssertionError("sources were hashed although unchanged")

    with monkeypatch.context() as m:
        m.setattr(pathfinder, "tree_record", no_hashing)
        m.setattr(pathfinder, "file_record", no_hashing)
        assert tasks.prepare("pathfinder", tmp_path / "src", tmp_path, progress=False) == cache
    png = next((tmp_path / "src").rglob("sample_1.png"))
    stamp = (cache / "train.tokens.npy").stat().st_mtime_ns
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))  # touched, same bytes
    tasks.prepare("pathfinder", tmp_path / "src", tmp_path, progress=False)
    after = read_manifest(cache)
    assert (cache / "train.tokens.npy").stat().st_mtime_ns == stamp  # not rebuilt
    assert after["sources"] == built["sources"] and after["source_stat"] != built["source_stat"]
    png.write_bytes(next((tmp_path / "src").rglob("sample_2.png")).read_bytes())  # new content
    tasks.prepare("pathfinder", tmp_path / "src", tmp_path, progress=False)
    assert read_manifest(cache)["sources"][-1]["sha256"] != built["sources"][-1]["sha256"]
