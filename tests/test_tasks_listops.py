"""ListOps: the seeded generator, the official TSV reader and tokenisation, the fixed vocabulary."""
import json
import random

import numpy as np
import pytest

import tasks
from tasks import listops
from tasks._common import DataError, read_manifest
from tasks.fixtures import listops_tsv


def reference_value(source: str) -> int:
    """Evaluate a printed ListOps tree independently of the generator: a stack over the raw TSV tokens.

    Parentheses only group binary pairs, so they are ignored; an operator opens a frame and ``]`` closes it.
    MED uses numpy's median as the official ``to_value`` does.
    """
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)), "[SM": lambda a: sum(a) % 10}
    stack: list[list] = [[None, []]]
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token in ops:
            stack.append([token, []])
        elif token == "]":
            op, args = stack.pop()
            stack[-1][1].append(ops[op](args))
        else:
            stack[-1][1].append(int(token))
    assert len(stack) == 1 and len(stack[0][1]) == 1, source
    return stack[0][1][0]


def test_generator_length_bounds_token_count_and_labels():
    """Default settings keep 500 < length < 2000, the token count equals the length and the labels are right."""
    rng = random.Random(7)
    accepted = 0
    while accepted < 150:
        tree = listops.sample_tree(rng)
        if tree is None or tree[1] <= 500:
            continue
        source, length, value = tree
        accepted += 1
        assert 500 < length < 2000
        assert len(listops.tokenize(source)) == length
        assert value == reference_value(source)
    rows = listops.generate(60, seed=3)
    lengths = [len(listops.tokenize(s)) for s, _ in rows]
    assert min(lengths) > 500 and max(lengths) < 2000
    assert all(label == reference_value(s) for s, label in rows)
    assert len({s for s, _ in rows}) == len(rows)  # deduplicated as the official set()


def test_generator_short_trees_match_reference_and_med_truncates():
    """MED of an even count truncates the mean as int(np.median) does (docs/pitfalls.md, #4)."""
    rows = listops.generate(300, seed=11, min_length=1, max_length=80)
    assert all(label == reference_value(s) for s, label in rows)
    assert {label for _, label in rows} == set(range(10))
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = list(rng.integers(0, 10, rng.integers(2, 11)))
        assert listops.evaluate("[MED", values) == int(np.median(values))
    assert listops.evaluate("[MED", [1, 2]) == 1 and listops.evaluate("[SM", [9, 8]) == 7


def test_same_seed_gives_identical_files_crlf_and_header(tmp_path):
    """docs/pitfalls.md, #3: the official generator has no seed; ours regenerates byte for byte."""
    opts = dict(seed=5, num_train=20, num_val=5, num_test=5, min_length=20, max_length=200)
    a = listops.write_generated(tmp_path / "a", **opts)
    b = listops.write_generated(tmp_path / "b", **opts)
    c = listops.write_generated(tmp_path / "c", **{**opts, "seed": 6})
    for split in ("train", "val", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    data = a["train"].read_bytes()
    assert data.startswith(b"Source\tTarget\r\n")
    lines = data.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 22 and b"\n" not in b"".join(lines)
    # the train, val and test rows are disjoint (one deduplicated pool, then sliced)
    rows = [set(p.read_bytes().split(b"\r\n")[1:-1]) for p in a.values()]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])


def test_official_tokenisation_and_fixed_vocabulary():
    """docs/pitfalls.md, #7 (']' -> 'X', parentheses dropped, never a \\W splitter) and #6 (fixed, sorted ids)."""
    source = "( ( ( ( [MIN ( ( ( [MIN 8 ) 6 ) ] ) ) 1 ) 9 ) ] )"  # the doc's generator sample, label 1
    tokens = listops.tokenize(source)
    assert tokens == ["[MIN", "[MIN", "8", "6", "X", "1", "9", "X"]
    assert reference_value(source) == 1
    assert listops.VOCAB == ["<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "X", "[MAX", "[MED", "[MIN",
                             "[SM"]
    assert listops.VOCAB[1:] == sorted(listops.VOCAB[1:])
    assert listops.MODEL.vocab_size == 16 and listops.MODEL.max_len == 2048 and listops.MODEL.num_classes == 10


def test_reads_official_layout_and_tokens_are_the_vocab_ids(tmp_path):
    """The lra_release/lra_release/listops-1000 layout reads; ids follow the fixed vocabulary (docs/pitfalls.md, #6)."""
    root = listops_tsv(tmp_path / "lra_release" / "lra_release" / "listops-1000")
    cache = tasks.prepare("listops", tmp_path, tmp_path / "cache", progress=False)
    manifest = read_manifest(cache)
    assert manifest["counts"] == {"train": 24, "val": 8, "test": 8}
    assert manifest["vocab"] == listops.VOCAB and manifest["vocab_size"] == 16
    assert [s["path"] for s in manifest["sources"]] == ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]
    first = (root / "basic_val.tsv").read_bytes().split(b"\r\n")[1].decode()
    source, label = first.split("\t")
    item = tasks.load("listops", cache, "val")[0]
    assert item["input_ids"].tolist() == [listops.VOCAB.index(t) for t in listops.tokenize(source)]
    assert item["label"].item() == int(label)


def test_vocabulary_ids_do_not_depend_on_the_data(tmp_path):
    """docs/pitfalls.md, #6: official ids follow a hash-ordered set of the tokens seen; ours are one sorted list."""
    a = tasks.prepare("listops", listops_tsv(tmp_path / "a"), tmp_path / "ca", progress=False)
    root = tmp_path / "b"
    root.mkdir()
    for name in listops.FILES.values():  # only MAX trees: the data sees 12 of the 15 symbols
        rows = [(s, v) for s, v in listops.generate(8, seed=2, min_length=3, max_length=30) if "[MAX" in s][:3]
        rows = [("( ( ( [MAX 3 ) 7 ) ] )", 7)] + rows
        (root / name).write_bytes(listops.tsv_bytes(rows))
    b = tasks.prepare("listops", root, tmp_path / "cb", progress=False)
    assert read_manifest(a)["vocab"] == read_manifest(b)["vocab"] == listops.VOCAB
    first = tasks.load("listops", b, "train")[0]["input_ids"].tolist()
    assert first == [listops.VOCAB.index(t) for t in ["[MAX", "3", "7", "X"]] == [12, 4, 8, 11]


@pytest.mark.parametrize("line, message", [
    ("( [MAX 1 ) 2 ) ] )\t1\textra", "expected 2 tab-separated fields"),
    ("( ( [MAX 1 ) 2 ) ] )\t12", "label 12 out of range"),
    ("( ( [MAX 1 ) 2 ) ] )\tx", "Target 'x' is not an integer"),
    ("( ( [FIRST 1 ) 2 ) ] )\t1", "unknown token(s) ['[FIRST']"),
])
def test_malformed_lines_name_file_line_and_show_it(tmp_path, line, message):
    """A malformed line names file and line and shows it; no cache is left behind (no silent token loss)."""
    root = listops_tsv(tmp_path / "src")
    path = root / "basic_test.tsv"
    lines = path.read_bytes().split(b"\r\n")
    lines[3] = line.encode()
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataError) as err:
        tasks.prepare("listops", root, tmp_path / "cache", progress=False)
    assert f"basic_test.tsv:4: {message}" in str(err.value) and repr(line)[:30] in str(err.value)
    assert not (tmp_path / "cache" / "listops").exists()


def test_header_missing_empty_split_and_missing_source(tmp_path):
    """A missing header, an empty split or a missing source each fail with what to do (docs/pitfalls.md, #1)."""
    root = listops_tsv(tmp_path / "src")
    val = root / "basic_val.tsv"
    val.write_bytes(val.read_bytes().split(b"\r\n", 1)[1])
    with pytest.raises(DataError, match=r"basic_val.tsv:1: expected the header 'Source<TAB>Target'"):
        tasks.prepare("listops", root, tmp_path / "cache", progress=False)
    val.write_bytes(b"Source\tTarget\r\n")
    with pytest.raises(DataError, match=r"basic_val.tsv: no examples \(the file is empty or holds the header alone\)"):
        tasks.prepare("listops", root, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="basic_train.tsv, basic_val.tsv, basic_test.tsv"):
        tasks.prepare("listops", tmp_path / "nowhere", tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="only apply when ListOps is generated"):
        tasks.prepare("listops", root, tmp_path / "cache", progress=False, seed=3)


def test_generated_default_cache_is_reused_and_rebuilt_on_new_options(tmp_path):
    """The generated set is made once per seed/options and rebuilt when they change (docs/pitfalls.md, #3)."""
    small = dict(num_train=12, num_val=4, num_test=4, min_length=10, max_length=60)
    cache = tasks.prepare("listops", None, tmp_path, progress=False, **small)
    manifest = read_manifest(cache)
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 4}
    assert (manifest["max_tokens"], manifest["max_len"]) == (59, 64) and manifest["longest"] <= 59
    assert manifest["options"]["seed"] == 0 and (cache / "raw" / "basic_train.tsv").is_file()
    assert manifest["generated_files"]["train"]["sha256"]
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    tasks.prepare("listops", None, tmp_path, progress=False, **small)
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp  # reused
    tasks.prepare("listops", None, tmp_path, progress=False, **small, seed=1)
    assert read_manifest(cache)["options"]["seed"] == 1
    assert read_manifest(cache)["generated_files"]["train"]["sha256"] != manifest["generated_files"]["train"]["sha256"]


def test_generator_2_gives_the_same_bytes_on_any_number_of_processes(tmp_path):
    opts = dict(seed=4, num_train=300, num_val=20, num_test=20, min_length=20, max_length=200)
    files = [listops.write_generated(tmp_path / str(w), workers=w, **opts) for w in (1, 2, 3)]
    for split in ("train", "val", "test"):
        assert files[0][split].read_bytes() == files[1][split].read_bytes() == files[2][split].read_bytes()
    rows = listops.generate(340, **{k: opts[k] for k in ("seed", "min_length", "max_length")})
    assert all(label == reference_value(s) for s, label in rows)
    assert len({s for s, _ in rows}) == 340 and all(20 < len(listops.tokenize(s)) < 200 for s, _ in rows)


def test_generator_1_is_the_sequential_stream_of_the_first_standard_set():
    """Frozen bytes: generator 1 is what lra-soft generated before generator 2 (the first published runs)."""
    import hashlib
    rows = listops.generate(50, seed=0, min_length=10, max_length=100, generator=1)
    assert hashlib.sha256(listops.tsv_bytes(rows)).hexdigest() == \
        "11626cad0f0162dd532569e2ae444b8b3c082a074508749873acb42433dda8c8"


def test_both_generators_draw_the_same_distribution():
    """Labels and lengths of 600 short trees each: the fast draw of generator 2 keeps the official distribution
    (a two-sample check loose enough for chance, tight enough for a wrong branch probability or arity)."""
    kw = dict(seed=9, min_length=5, max_length=120)
    one, two = listops.generate(600, generator=1, **kw), listops.generate(600, generator=2, workers=1, **kw)
    lengths = [np.array([len(listops.tokenize(s)) for s, _ in rows]) for rows in (one, two)]
    assert abs(lengths[0].mean() - lengths[1].mean()) < 4 * np.hypot(lengths[0].std(), lengths[1].std()) / 600 ** .5
    labels = [np.bincount([label for _, label in rows], minlength=10) / 600 for rows in (one, two)]
    assert np.abs(labels[0] - labels[1]).max() < 0.06


def test_unknown_generator_is_refused_before_any_work(tmp_path):
    with pytest.raises(DataError, match="generator=3 .* must be one of \\[1, 2\\]"):
        tasks.prepare("listops", None, tmp_path, progress=False, generator=3)
    assert not (tmp_path / "listops").exists()


def test_tokenizing_on_several_processes_gives_the_same_rows_and_the_first_error(tmp_path, monkeypatch):
    monkeypatch.setattr(listops, "CHUNK_LINES", 7)  # many chunks from a small file
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(listops.tsv_bytes(listops.generate(60, seed=2, min_length=5, max_length=50)))
    one = [(n, ids.tolist(), label) for n, ids, label in listops.read_tsv(path, workers=1)]
    two = [(n, ids.tolist(), label) for n, ids, label in listops.read_tsv(path, workers=2)]
    assert one == two and [n for n, _, _ in one] == list(range(2, 62))
    lines = path.read_bytes().split(b"\r\n")
    lines[40], lines[50] = b"( [MAX 1 2 ] )\t12", b"( [MAX 1 Q ] )\t1"  # two errors, in different chunks
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataError, match=r"basic_train.tsv:41: label 12 out of range"):
        list(listops.read_tsv(path, workers=2))


def test_the_manifest_names_the_generator_version(tmp_path):
    small = dict(num_train=6, num_val=2, num_test=2, min_length=5, max_length=40)
    two = read_manifest(tasks.prepare("listops", None, tmp_path / "two", progress=False, **small))
    one = read_manifest(tasks.prepare("listops", None, tmp_path / "one", progress=False, generator=1, **small))
    assert two["options"]["generator"] == 2 and "generator" not in one["options"]  # generator 1: the old identity
    assert "listops-gen-2" in json.dumps(two) and "listops-gen-1" in json.dumps(one)
