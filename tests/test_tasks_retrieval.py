"""Retrieval (AAN pairs): headerless 5-column TSV with literal quotes, b'...' texts, int(float(label))."""
import ast

import numpy as np
import pytest

import tasks
from tasks import retrieval
from tasks._common import DataError, read_manifest
from tasks.fixtures import aan_tsv


def test_reads_every_row_with_literal_quotes_and_repr_text(tmp_path):
    """docs/pitfalls.md, #10: no header (the first row is data) and quotes are characters, not CSV quoting."""
    root = aan_tsv(tmp_path / "lra_release" / "lra_release")
    cache = tasks.prepare("retrieval", tmp_path, tmp_path / "c", progress=False)
    m = read_manifest(cache)
    assert m["counts"] == {"train": 24, "val": 8, "test": 8} and m["pair"] and m["max_len"] == 4096
    first = (root / "new_aan_pairs.train.tsv").read_bytes().split(b"\n")[0].split(b"\t")
    assert b'"' in first[3] + first[4] and first[3].startswith(b"b'")
    item = tasks.load("retrieval", cache, "train")[0]
    assert item["label"].item() == int(first[0])
    assert item["input_ids"].tolist() == list(np.frombuffer(first[3], np.uint8) + 1)  # the repr, as is
    assert item["input_ids2"].tolist() == list(np.frombuffer(first[4], np.uint8) + 1)
    assert item["input_ids"][:2].tolist() == [ord("b") + 1, ord("'") + 1]


def test_decode_option_and_truncation(tmp_path):
    """decode=true evaluates the b'...' literal; documents keep their first max_length bytes (docs/pitfalls.md, #10)."""
    root = aan_tsv(tmp_path)
    cache = tasks.prepare("retrieval", root, tmp_path / "c", progress=False, decode=True, max_length=30)
    first = (root / "new_aan_pairs.eval.tsv").read_bytes().split(b"\n")[0].split(b"\t")
    raw = ast.literal_eval(first[3].decode())
    assert b"\n" in raw and "\u00ef".encode() in raw  # the escapes stand for real bytes
    item = tasks.load("retrieval", cache, "val")[0]
    assert item["input_ids"].tolist() == list(np.frombuffer(raw[:30], np.uint8) + 1)
    assert read_manifest(cache)["longest"] == 30


def test_float_labels_and_crlf(tmp_path):
    """docs/pitfalls.md, #4: labels may be float text; parse as int(float(x))."""
    root = aan_tsv(tmp_path)
    path = root / "new_aan_pairs.test.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"1.0" + lines[0][1:]
    path.write_bytes(b"\r\n".join(lines))
    cache = tasks.prepare("retrieval", root, tmp_path / "c", progress=False)
    item = tasks.load("retrieval", cache, "test")[0]
    assert item["label"].item() == 1 and item["input_ids2"][-1].item() == ord("'") + 1  # \r stripped


@pytest.mark.parametrize("edit, message", [
    (lambda f: f[:4], "expected 5 tab-separated fields (label, id1, id2, text1, text2), got 4"),
    (lambda f: [b"2"] + f[1:], "label 2 out of range (0 or 1)"),
    (lambda f: [b"yes"] + f[1:], "label b'yes' is not a number"),
])
def test_malformed_lines_name_file_and_line(tmp_path, edit, message):
    """Wrong column counts and labels name file and line (docs/pitfalls.md, #10, #4)."""
    root = aan_tsv(tmp_path)
    path = root / "new_aan_pairs.eval.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"\t".join(edit(lines[2].split(b"\t")))
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as err:
        tasks.prepare("retrieval", root, tmp_path / "c", progress=False)
    assert f"new_aan_pairs.eval.tsv:3: {message}" in str(err.value)


def test_decode_rejects_non_literals_and_missing_files_list_layouts(tmp_path):
    """decode=true refuses non-literals; a missing file lists the layouts (docs/pitfalls.md, #10, #1)."""
    root = aan_tsv(tmp_path)
    path = root / "new_aan_pairs.train.tsv"
    path.write_bytes(path.read_bytes().replace(b"\tb'", b"\tnot-a-literal '", 1))
    with pytest.raises(DataError, match=r"new_aan_pairs.train.tsv:1: decode=true needs texts that are Python bytes"):
        tasks.prepare("retrieval", root, tmp_path / "c", progress=False, decode=True)
    (root / "new_aan_pairs.test.tsv").unlink()
    with pytest.raises(DataError, match=r"(?s)no recognised data layout.*lra_release/lra_release/tsv_data/"):
        tasks.prepare("retrieval", tmp_path, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="needs --source"):
        retrieval.prepare(None, tmp_path / "c")
