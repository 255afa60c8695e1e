"""Checkpoint files: atomic writes, weights_only loading, clear errors, RNG round trip; device helpers."""
import os
import random

import numpy as np
import pytest
import torch

from lra_soft.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                                 save_checkpoint)
from lra_soft.distributed import autocast, init_distributed, resolve_device


def test_roundtrip_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "a.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                               "rng": capture_rng_state(), "step": 7, "vocab": ["<pad>", "X"]})
    state = load_checkpoint(path, required=("model", "step"))
    assert state["step"] == 7 and state["vocab"] == ["<pad>", "X"]
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    torch.load(path, weights_only=True)  # no pickled classes anywhere
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_rng_roundtrip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1]
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="layout"):
        load_checkpoint(foreign)
    save_checkpoint(tmp_path / "ok.pt", {"step": 1})
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "ok.pt", required=("model",))


def test_failed_write_keeps_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: 0})  # not picklable -> the write fails midway
    assert load_checkpoint(path)["step"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_device_helpers():
    assert resolve_device("cpu") == torch.device("cpu")
    assert init_distributed("cpu").world_size == 1
    for bad in ("tpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "mps"):
        with pytest.raises(ValueError, match=r"--device '.*' is not one of auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with autocast(torch.device("cpu")):  # CPU stays float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device_without_cuda(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    for asked in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=f"--device {asked} asks for CUDA, but torch sees no CUDA device"):
            resolve_device(asked)


def test_resolve_device_with_two_gpus(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_one_named_gpu_for_many_torchrun_processes_fails(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="names one GPU for all 2 torchrun processes"):
        init_distributed("cuda:1")
