"""Checkpoints that survive a SIGKILL at any moment and load with ``torch.load(weights_only=True)``.

    save_checkpoint(path, {"model": model.state_dict(), "optimizer": ..., "rng": capture_rng_state(), "step": 10})
    state = load_checkpoint(path)                      # dict; clear errors for missing / corrupt / foreign files
    restore_rng_state(state["rng"])

A write goes through ``lra_soft.atomic`` (a temporary file beside the target, fsynced, then ``os.replace``d over it),
so a reader only ever sees the old file or the complete new one; on a full disk the previous file stays and
``lra_soft.atomic.DiskFull`` says so.
Everything stored is tensors and plain Python values: no pickled classes, hence the safe ``weights_only`` loader.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lra_soft.atomic import atomic_open

__all__ = ["FORMAT", "CheckpointError", "capture_rng_state", "load_checkpoint", "restore_rng_state",
           "save_checkpoint"]

FORMAT = "lra_soft.checkpoint/1"  # stored under "format"; bump when the layout changes incompatibly


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or of another layout; the message says which and what to do."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts, plain types) atomically; adds ``"format"``."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    state = {**state, "format": FORMAT}
    # Into a file object: on a full disk torch.save(path) fails with an opaque RuntimeError, through Python's own
    # writes it is the OSError (ENOSPC) that lra_soft.atomic turns into DiskFull.
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; ``required`` keys must be present."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a last.pt/best.pt "
                              "written by `cli.py train` (the run directory holds both)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        # torch's own text is left out: for a foreign pickle it advises weights_only=False, which runs its code
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of lra-soft: corrupt, truncated, or another "
                              f"tool's file ({type(e).__name__}); pass a best.pt / last.pt of `cli.py train`, or "
                              "train again") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has layout {found!r}, this version of lra_soft reads {FORMAT!r}; "
                              "it was written by another tool or version")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is not a checkpoint of this kind "
                              f"(keys: {sorted(state)})")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

