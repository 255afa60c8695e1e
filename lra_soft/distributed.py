"""Device choice, mixed precision and data-parallel plumbing shared by every training loop (LRA and ImageNet).

One process per device, launched by PyTorch's own engine: ``torchrun --nproc_per_node N cli.py train ...`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT``; :func:`init_distributed` reads them and joins the
process group (NCCL on CUDA, gloo on CPU). A plain ``python cli.py ...`` is a world of one and touches nothing.

    dist_info = init_distributed("auto")          # DistInfo(rank, world_size, local_rank, device)
    with autocast(dist_info.device): loss = ...   # bf16 on CUDA, a no-op on CPU
    all_reduce_sum(t); barrier(); if is_main(): save ...
    cleanup()

An error on one process must not leave the others waiting forever in their next collective: ``agree`` exchanges
every process's status (failed or not, a stop signal or not) at points all of them reach, over a gloo group of CPU
tensors (no GPU synchronisation). Every collective here agrees first, and the training step agrees before each
forward and before the backward that all-reduces the gradients (DDP's own collectives), so a process that failed
anywhere before those points is met there: every process raises :class:`ProcessFailed` with the failing one's
message. (A failure *inside* the gradient all-reduce of a backward is left to torch's timeouts: the others are
blocked in a collective by then.)

bf16 autocast covers the matmuls of the model; each attention keeps its numerically delicate parts (Gaussian kernel,
Newton inverse, softmax) in float32 itself, so nothing here special-cases an attention.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CONTROL: dist.ProcessGroup | None = None  # the gloo group of ``agree``, made at its first call


class ProcessFailed(RuntimeError):
    """An error on one process of a distributed run, raised on every process with the same message."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0                 # global rank; 0 logs and saves
    world_size: int = 1           # number of processes (1 = no process group)
    local_rank: int = 0           # rank on this node = CUDA device index
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICES = "auto, cpu, cuda or cuda:N"  # what every --device flag accepts


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda``: GPU ``local_rank`` (torchrun's, one GPU per process).
    ``cuda:N``: GPU N. A ValueError names the value and what this machine has when it cannot be had."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device {device!r} is not one of {DEVICES}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for CUDA, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if match.group(1) is None:
        return torch.device("cuda", local_rank % count)
    if int(match.group(1)) >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", int(match.group(1)))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment names one; otherwise a world of one on ``device``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and dev.type == "cuda" and ":" in device:
        raise ValueError(f"--device {device} names one GPU for all {world_size} torchrun processes; pass --device "
                         "cuda, and each process takes GPU LOCAL_RANK")
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # DistributedDataParallel imports torch._dynamo on first use; imported after the group exists, dynamo keeps
        # references to it that destroy_process_group cannot drop, so gloo's worker threads outlive the group into
        # interpreter finalisation, where they can abort the exit (SIGABRT). Imported first, it keeps none.
        import torch._dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        # A process that ends without destroying its group can abort in interpreter finalisation (gloo's worker
        # threads still alive: SIGABRT, "terminate called without an active exception"); whoever calls fit()
        # under torchrun without cleanup() is covered. cleanup() is a no-op once the group is gone.
        atexit.register(cleanup)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def _control_group() -> dist.ProcessGroup:
    """gloo for CPU status tensors: the default group when it is gloo, else one made now (every process is here)."""
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def agree(failed: BaseException | None = None, stop: int = 0) -> int:
    """Every process's status, where all of them call this. If any ``failed``, raise ProcessFailed on every process
    with the message of the lowest failing rank; else return the largest ``stop`` (a signal number, 0 = none) asked
    for by any process. A world of one: ``failed`` is raised as it is, ``stop`` returned."""
    if not is_dist():
        if failed is not None:
            raise failed
        return stop
    n, me = world_size(), rank()
    status = torch.zeros(n + 1, dtype=torch.int64)
    status[n] = stop
    if failed is not None:
        status[me] = 1
    dist.all_reduce(status, op=dist.ReduceOp.MAX, group=_control_group())
    failing = status[:n].nonzero().flatten().tolist()
    if failing:
        box = [describe(failed) if me == failing[0] else None]
        dist.broadcast_object_list(box, src=failing[0], group=_control_group())
        raise ProcessFailed(f"process {failing[0]} of {n} failed: {box[0]}") from failed
    return int(status[n])


def barrier() -> None:
    if is_dist():
        agree()
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place and returned; identity in a world of one."""
    if is_dist():
        agree()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(world_size())


def all_gather_objects(obj: object) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a world of one."""
    if not is_dist():
        return [obj]
    agree()
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every process (e.g. a decision only rank 0 can make)."""
    if not is_dist():
        return obj
    agree()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def autocast(device: torch.device, precision: bool | str = True):
    """Mixed precision on CUDA: ``"bf16"`` (or True), ``"fp16"`` (pair it with ``grad_scaler``), ``"fp32"`` (or
    False) = none. Full float32 on CPU whatever is asked, where bf16 is slow and lossy."""
    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: bool | str) -> torch.amp.GradScaler:
    """fp16 on CUDA needs loss scaling (the harness's GradScaler); a disabled scaler elsewhere is a no-op."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def cleanup() -> None:
    """Leave the process group, and let it go now: a DistributedDataParallel model still caught in a reference cycle
    (a failed run's traceback) holds the group, and with it gloo's worker threads, until the garbage collector runs."""
    global _CONTROL
    _CONTROL = None
    if is_dist():
        dist.destroy_process_group()
        gc.collect()
