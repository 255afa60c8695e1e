"""Keep freed large CPU blocks in the process instead of returning them to the OS (glibc `mallopt`).

glibc serves every allocation above its mmap threshold (adjusted at run time, but never above 32 MiB on 64-bit systems)
with a fresh `mmap` and unmaps it on free, and it gives the top of its heap back to the OS once more than twice that
threshold is free there. So each such tensor is page-faulted and zeroed by the kernel again every time it is allocated.
Long sequences cross that line: at n = 16384 (batch 8, 2 heads, head dim 32) every (b, h, n, d) float32 tensor is
32 MiB, and the page faults made SOFT (m = 64) 5.5x slower than at n = 4096 instead of 4x (175 ms against 32 ms
a forward+backward; 114 ms with the tuning below; `docs/bench`). In the paper's LRA setting at n = 4096 (m = 1024,
inverse="solve") one forward+backward page-faulted 415-472 MiB without it and nothing with it (`scripts/bench_plain.py`,
docs/benchmarks.md). Allocating and filling a fresh 32 MiB tensor took 7.8 ms untuned and 1.8 ms tuned on the
development machine.

`keep_freed_memory` raises the mmap threshold (so large blocks come from the heap and are reused) and the trim
threshold (so the heap is not shrunk after each step). It is what PyTorch's CPU performance guide gets by preloading
jemalloc or tcmalloc, without a dependency. It changes no result. The costs, for the whole process and every library
in it: the heap keeps its peak size until the process exits (`release_freed_memory` hands the free part back on
demand), and blocks up to 1 GiB no longer come from mmap.

Who applies it: the CLI at start (`--no-malloc-tuning` to opt out), and `soft_attention` itself the first time it
runs on CPU tensors (`tune_on_first_cpu_use`), so that a library user who only calls the attention gets the same
speed. Never at import. Opt out of the lazy tuning with the environment variable ``LRA_SOFT_MALLOC_TUNING=0`` or
`set_lazy_tuning(False)`; either is read at the first CPU call. Benchmarks record `tuned` after their runs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_INT_MAX = 2**31 - 1
ENV = "LRA_SOFT_MALLOC_TUNING"  # "0": soft_attention leaves malloc alone
tuned = False  # whether keep_freed_memory has been applied in this process (benchmarks record it)
_lazy = True  # set_lazy_tuning's switch
_first_cpu_use_seen = False  # the lazy tuning is decided once, at the first CPU call


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (Linux), else None: musl's mallopt accepts and ignores everything, macOS and
    Windows have none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.gnu_get_libc_version  # only glibc has the latter
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Tune glibc malloc as described above; True if applied, False where the C library is not glibc (macOS,
    Windows, musl), in which case nothing changes."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global tuned
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX)) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return tuned


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS now (glibc `malloc_trim(0)`), e.g. after a memory-hungry phase of a
    long-lived process; the tuning stays, so the next large allocations are page-faulted once more. True if glibc
    released anything."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def set_lazy_tuning(enabled: bool) -> None:
    """Allow or forbid `soft_attention`'s lazy tuning (default: allowed unless LRA_SOFT_MALLOC_TUNING=0). Has an
    effect only before the first CPU call; it never undoes a tuning already applied."""
    global _lazy
    _lazy = bool(enabled)


def tune_on_first_cpu_use(device_type: str) -> None:
    """`keep_freed_memory` once per process, at the first call on a CPU tensor, unless opted out; every later call
    reads one global and returns. (`soft_attention` does not call it while torch.compile traces; a compiled model
    that never runs SOFT eagerly should call `keep_freed_memory` up front.)"""
    global _first_cpu_use_seen
    if _first_cpu_use_seen or device_type != "cpu":
        return
    _first_cpu_use_seen = True
    if _lazy and os.environ.get(ENV, "1") != "0" and not tuned:
        keep_freed_memory()
