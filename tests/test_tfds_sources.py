"""tfds: sources of Text and Image, read through tensorflow-datasets for real (docs/data.md, tfds).

The data is prepared by tfds's own ``imdb_reviews`` and ``cifar10`` builders from the committed fixture layouts (the
download is replaced by the fixture archive), in both of tfds's file formats: ArrayRecord (read through
``tfds.data_source``, without TensorFlow) and TFRecord (through ``tf.data``). Tokens must equal those of the raw-format
readers on the same examples. ``tfds.testing.mock_data`` feeds the fixture examples through tfds's loading path in
order. These tests need the ``[tfds]`` extra, which the ``[dev]`` extra installs; without it they fail rather than
skip, so that CI cannot pass without running them.
"""
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import tasks
from tasks._common import DataError, read_manifest
from tasks.fixtures import aclimdb, cifar_batches, cifar_binary

pytestmark = pytest.mark.slow  # tfds and TensorFlow take seconds to import and to build the data

CIFAR_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ROOT = Path(__file__).resolve().parents[1]
# Hide TensorFlow from a child process as if it were not installed (find_spec -> None, import -> ModuleNotFoundError)
NO_TENSORFLOW = """
import sys
class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.inner.find_spec(name, path, target) if hasattr(self.inner, "find_spec") else None
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def tfds_prepared(root: Path, file_format: str, per_class: tuple[int, int] = (40, 10)) -> Path:
    """tfds's real imdb_reviews and cifar10 builders run on the fixture layouts: a TFDS_DATA_DIR holding both."""
    import tensorflow_datasets as tfds

    acl = aclimdb(root / "acl", per_class)
    (acl / "train" / "unsup").mkdir()  # the builder writes an "unsupervised" split and refuses an empty one
    (acl / "train" / "unsup" / "0_0.txt").write_text("An unlabelled review.\n")
    archive = root / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(acl, arcname="aclImdb")
    cifar = cifar_binary(root / "cifar")
    (cifar / "batches.meta.txt").write_text("\n".join(CIFAR_LABELS) + "\n")
    data_dir = root / "tfds"
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    manager = tfds.download.DownloadManager
    with mock.patch.object(manager, "download", lambda self, url: str(archive)), \
            mock.patch.object(manager, "download_and_extract", lambda self, url: str(cifar.parent)):
        for name in ("imdb_reviews", "cifar10"):
            tfds.builder(name, data_dir=str(data_dir), file_format=file_format).download_and_prepare(
                download_config=config)
    return data_dir


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def prepared(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, tfds_prepared(root, request.param)


def tokens(cache, split):
    ds = tasks.load(tasks.manifest(cache)["task"], cache, split)
    return [(tuple(ds[i]["input_ids"].tolist()), ds[i]["label"].item()) for i in range(len(ds))]


def test_prepared_tfds_equals_the_raw_readers(prepared, tmp_path, monkeypatch):
    """Both formats: the same examples as aclImdb and the CIFAR binary batches, token for token; tfds orders them
    otherwise (docs/pitfalls.md, #3), so Image's train/val cut differs and only train + val is the same set."""
    file_format, root, data_dir = prepared
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    text = tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "t", progress=False, val="test")
    raw = tasks.prepare("text", root / "acl", tmp_path / "t_raw", progress=False, val="test")
    for split in ("train", "test"):
        assert Counter(tokens(text, split)) == Counter(tokens(raw, split))
    record = read_manifest(text)["sources"][0]
    assert {k: v for k, v in record.items() if k != "splits"} == {
        "tfds": "imdb_reviews", "config": "plain_text", "version": "1.0.0", "file_format": file_format}
    assert {s: v["examples"] for s, v in record["splits"].items()} == {"train": 80, "test": 20}
    assert all(v["bytes"] > 0 for v in record["splits"].values())

    image = tasks.prepare("image", "tfds:cifar10", tmp_path / "i", progress=False)
    raw = tasks.prepare("image", root / "cifar", tmp_path / "i_raw", progress=False)
    assert read_manifest(image)["counts"] == read_manifest(raw)["counts"] == {"train": 72, "val": 8, "test": 16}
    assert Counter(tokens(image, "test")) == Counter(tokens(raw, "test"))
    assert (Counter(tokens(image, "train") + tokens(image, "val"))
            == Counter(tokens(raw, "train") + tokens(raw, "val")))
    assert tokens(image, "train") != tokens(raw, "train")  # tfds's own order, as in LRA's pipeline
    record = read_manifest(image)["sources"][0]
    assert (record["tfds"], record["version"], record["file_format"]) == ("cifar10", "3.0.2", file_format)


def test_new_tfds_data_rebuilds_the_cache(tmp_path, monkeypatch):
    """The cache key holds the builder's name, config, version, format and split sizes: other data, other cache."""
    small = tfds_prepared(tmp_path / "small", "array_record", per_class=(20, 5))
    large = tfds_prepared(tmp_path / "large", "array_record")
    monkeypatch.setenv("TFDS_DATA_DIR", str(small))
    cache = tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "c", progress=False)
    assert read_manifest(cache)["counts"] == {"train": 36, "val": 4, "test": 10}
    assert tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "c", progress=False) == cache
    assert read_manifest(cache)["counts"]["test"] == 10  # the same data: the cache is reused
    monkeypatch.setenv("TFDS_DATA_DIR", str(large))
    tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "c", progress=False)
    assert read_manifest(cache)["counts"] == {"train": 72, "val": 8, "test": 20}
    assert read_manifest(cache)["sources"][0]["splits"]["test"]["examples"] == 20


def run_without_tensorflow(code: str, data_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TFDS_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TENSORFLOW + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_array_record_is_read_without_tensorflow_and_tfrecord_says_what_to_install(prepared, tmp_path):
    """ArrayRecord data goes through tfds.data_source with TensorFlow absent; TFRecord data then fails in one line
    naming what to install, before any work."""
    file_format, root, data_dir = prepared
    code = """
import sys, tasks
from tasks._common import DataError, read_manifest
try:
    cache = tasks.prepare("image", "tfds:cifar10", "cache", progress=False)
except DataError as e:
    print("DataError:", e)
else:
    print(read_manifest(cache)["counts"], "tensorflow" in sys.modules)
"""
    out = run_without_tensorflow(code, data_dir, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    if file_format == "array_record":
        assert last == "{'train': 72, 'val': 8, 'test': 16} False"
    else:
        assert last.startswith("DataError: source tfds:cifar10: its prepared data is stored as tfrecord files")
        assert "TensorFlow is not installed: pip install 'lra-soft[tfds]'" in last
        assert "--file_format=array_record" in last and not (tmp_path / "cache").exists()


def test_mock_data_feeds_fixture_examples_through_tfds(tmp_path):
    """tfds.testing.mock_data, with the fixtures as its examples in order: the tokens equal the raw readers' exactly
    (same order, so the same validation carve-outs)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from tasks.text import _read_acl

    acl = aclimdb(tmp_path / "acl")
    reviews = {s: list(_read_acl(acl, s)) for s in ("train", "test")}
    batches = cifar_batches()
    images = {"train": [batches[f"data_batch_{i}"] for i in range(1, 6)], "test": [batches["test_batch"]]}
    cifar_binary(tmp_path / "cifar")

    def as_dataset(builder, split, **kwargs):
        if builder.name == "imdb_reviews":
            text, label = zip(*reviews[str(split)])
            return tf.data.Dataset.from_tensor_slices({"text": list(text), "label": np.array(label, np.int64)})
        rgb = np.concatenate([b[0] for b in images[str(split)]])
        label = np.concatenate([b[1] for b in images[str(split)]])
        return tf.data.Dataset.from_tensor_slices({"image": rgb, "label": label,
                                                  "id": [f"{split}_{i:05d}" for i in range(len(label))]})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        text = tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "t", progress=False)
        image = tasks.prepare("image", "tfds:cifar10", tmp_path / "i", progress=False)
    raw_text = tasks.prepare("text", acl, tmp_path / "t_raw", progress=False)
    raw_image = tasks.prepare("image", tmp_path / "cifar", tmp_path / "i_raw", progress=False)
    for split in ("train", "val", "test"):
        assert tokens(text, split) == tokens(raw_text, split)
        assert tokens(image, split) == tokens(raw_image, split)
    assert read_manifest(text)["sources"][0]["tfds"] == "imdb_reviews"


def test_missing_or_unknown_tfds_data_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"source tfds:imdb_reviews: tfds could not open split 'train' .*"
                                        r"file_format='array_record'\).download_and_prepare\(\)"):
        tasks.prepare("text", "tfds:imdb_reviews", tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"source tfds:no_such_set: tfds cannot open 'no_such_set' "
                                        r"\(DatasetNotFoundError"):
        tasks.prepare("image", "tfds:no_such_set", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_missing_tensorflow_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    for task, source in (("text", "tfds:imdb_reviews"), ("image", "tfds:cifar10")):
        with pytest.raises(DataError, match=r"tensorflow-datasets, which is not installed: pip install "
                                            r"'lra-soft\[tfds\]'"):
            tasks.prepare(task, source, tmp_path / "c", progress=False)
