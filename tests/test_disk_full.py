"""A full disk (the OSError ENOSPC of a write, simulated inside the atomic writer) keeps the previous checkpoint,
metrics and results, says in one line which file, what is intact and how much space is needed, and the run
resumes once there is space to the same end as a run that never hit it."""
import errno
import os

import pytest
import torch

from lra_soft import atomic
from lra_soft.atomic import DiskFull, atomic_write_text
from lra_soft.checkpoint import load_checkpoint, save_checkpoint
from lra_soft.engine import fit
from test_engine import LOOP, Toy


class _Filling:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (the part that fits is written)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = data if isinstance(data, str) else bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full(monkeypatch, name, room=1000, after=0):
    """The writes of ``name`` by lra_soft.atomic find the disk full, from its ``after``-th write on."""
    writes = []

    def open_(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if f".{name}." in str(path):
            writes.append(path)
            if len(writes) > after:
                return _Filling(f, room)
        return f

    monkeypatch.setattr(atomic, "open", open_, raising=False)


def test_a_checkpoint_written_on_a_full_disk_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(1000.0)}, "step": 2})
    before = path.read_bytes()
    _disk_full(monkeypatch, "last.pt")
    with pytest.raises(DiskFull) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "step": 4})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: no space left on device while writing it; ")
    assert f"the previous last.pt ({atomic.human_bytes(len(before))}) is intact" in message
    assert f"the new one needs about {atomic.human_bytes(len(before))} (the previous one's size)" in message
    assert "is free on its filesystem: free space there, then try again" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is gone


def test_a_first_file_on_a_full_disk_is_not_written(tmp_path, monkeypatch):
    _disk_full(monkeypatch, "results.json", room=3)
    with pytest.raises(DiskFull, match=r"results\.json was not written; the new one needs more than the 3 B "
                                       r"written before the disk filled, .* is free"):
        atomic_write_text(tmp_path / "results.json", "{}" * 10)
    assert list(tmp_path.iterdir()) == []


def test_a_run_on_a_full_disk_stops_with_its_last_checkpoint_and_resumes_to_the_same_end(tmp_path, monkeypatch):
    fit(Toy(LOOP), tmp_path / "straight", device="cpu", progress=False)
    run = tmp_path / "run"
    _disk_full(monkeypatch, "last.pt", after=1)  # last.pt at step 2 fits, the one at step 4 does not
    with pytest.raises(DiskFull, match=r"last\.pt: no space left on device while writing it; the previous last\.pt "
                                       r".* is intact; .*; the run stopped after step 4, and the last good checkpoint "
                                       r"is .*last\.pt \(step 2\): --resume continues from it$"):
        fit(Toy(LOOP), run, device="cpu", progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 2
    monkeypatch.undo()  # space was freed
    fit(Toy(LOOP), run, device="cpu", progress=False, resume=True)
    for name in ("metrics.jsonl", "steps.jsonl", "results.json"):
        assert (run / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def test_results_on_a_full_disk_leave_a_run_that_resume_finishes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _disk_full(monkeypatch, "results.json", room=3)
    with pytest.raises(DiskFull, match=r"results\.json was not written; .*; the run stopped after step 6, and the "
                                       r"last good checkpoint is .*last\.pt \(step 6\)"):
        fit(Toy(LOOP), run, device="cpu", progress=False)
    monkeypatch.undo()
    assert fit(Toy(LOOP), run, device="cpu", progress=False, resume=True)["steps"] == 6
    assert (run / "results.json").exists()


def test_a_metrics_line_on_a_full_disk_says_the_earlier_lines_are_intact(tmp_path, monkeypatch):
    import builtins

    from lra_soft import engine
    real = builtins.open

    def open_(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        return _Filling(f, 0) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(engine, "open", open_, raising=False)
    with pytest.raises(DiskFull, match=r"metrics\.jsonl: no space left on device while writing it; its earlier lines "
                                       r"are intact; a line needs little, .*; the run stopped after step 2, and no "
                                       r"checkpoint was written yet$"):
        fit(Toy(LOOP), tmp_path / "run", device="cpu", progress=False)
