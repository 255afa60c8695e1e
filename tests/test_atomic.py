"""lra_soft.atomic, the one atomic writer: umask-respecting mode, fsync before the rename, no temporary file left."""
import os
import stat

import numpy as np
import pytest
import torch

from lra_soft import atomic
from lra_soft.atomic import atomic_open, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from lra_soft.checkpoint import save_checkpoint
from tasks._common import atomic_save_npy


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _temporaries(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_writer_gives_the_mode_open_would_give(tmp_path, umask_022):
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    atomic_write_json(tmp_path / "c.json", {"a": 1})
    with atomic_open(tmp_path / "d.csv", "w", encoding="ascii") as f:
        f.write("x")
    atomic_write(tmp_path / "e.pt", lambda tmp: torch.save({"a": 1}, tmp))
    save_checkpoint(tmp_path / "f.pt", {"step": 1})  # was 0600 (mkstemp's) before lra_soft.atomic
    atomic_save_npy(tmp_path / "g.npy", np.arange(3))
    assert _mode(tmp_path / "plain") == 0o644
    for name in ("a.txt", "b.bin", "c.json", "d.csv", "e.pt", "f.pt", "g.npy"):
        assert _mode(tmp_path / name) == 0o644, name
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    assert _mode(tmp_path / "private.txt") == 0o600


def test_contents_and_return_value(tmp_path):
    assert atomic_write_text(tmp_path / "sub" / "a.txt", "héllo\n") == tmp_path / "sub" / "a.txt"  # makes parents
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "b.json", {"a": [1, 2]})
    assert (tmp_path / "b.json").read_text() == '{\n "a": [\n  1,\n  2\n ]\n}\n'
    atomic_save_npy(tmp_path / "c.npy", np.arange(4))
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("fail", [ValueError("midway"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, fail):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise fail

    with pytest.raises(type(fail)):
        atomic_write(target, broken)
    with pytest.raises(type(fail)):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise fail
    assert target.read_text() == "old" and _temporaries(tmp_path) == []


def test_a_failed_fsync_or_rename_removes_the_temporary(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk gone")

    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(atomic.os, name, broken)
            with pytest.raises(OSError, match="disk gone"):
                atomic_write_bytes(tmp_path / "a.bin", b"new")
        assert not (tmp_path / "a.bin").exists() and _temporaries(tmp_path) == [], name


def test_the_file_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                       if os.path.exists("/proc/self/fd") else "?"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_open(tmp_path / "a.npy") as f:
        np.save(f, np.zeros(2))
    save_checkpoint(tmp_path / "b.pt", {"step": 1})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync", "replace"]
    assert events[1] == ("replace", "a.npy") and events[3] == ("replace", "b.pt")
    if events[0][1] != "?":  # the temporary file is what was synced, not the target
        assert events[0][1].startswith(".a.npy.") and events[0][1].endswith(".tmp")
