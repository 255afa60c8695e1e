"""Keep freed large CPU blocks in the process instead of returning them to the OS (glibc `mallopt`).

glibc serves every allocation above its mmap threshold (adjusted at run time, but never above 32 MiB on 64-bit
systems) with a fresh `mmap` and unmaps it on free, so each such tensor is page-faulted and zeroed by the kernel again
every time it is allocated. Long sequences cross that line: at n = 16384 (batch 8, 2 heads, head dim 32) every
(b, h, n, d) float32 tensor is 32 MiB, and the page faults made SOFT (m = 64) 5.5x slower than at n = 4096 instead of
4x (175 ms against 32 ms a forward+backward; 114 ms with the tuning below; `docs/bench`). Allocating and
filling a fresh 32 MiB tensor took 7.8 ms untuned and 1.8 ms tuned on the development machine.

`keep_freed_memory` raises the mmap threshold (so large blocks come from the heap and are reused) and the trim
threshold (so the heap is not shrunk after each step). It is what PyTorch's CPU performance guide gets by preloading
jemalloc or tcmalloc, without a dependency. The cost: the process keeps its peak heap until it exits. It changes no
result. The CLI applies it (`--no-malloc-tuning` to opt out); library code never calls it on its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_INT_MAX = 2**31 - 1
tuned = False  # whether keep_freed_memory has been applied in this process (benchmarks record it)


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Tune glibc malloc as described above; True if applied, False where the C library is not glibc (macOS,
    Windows, musl), in which case nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    try:
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt accepts and ignores everything
    except AttributeError:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global tuned
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX)) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return tuned
