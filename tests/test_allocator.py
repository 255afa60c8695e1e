"""The glibc allocator tuning of the CLI: a 40 MiB tensor is served by mmap (page-faulted afresh at every allocation)
without it and from the reusable heap with it. Checked in subprocesses through glibc's own mallinfo2 counters."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, sys, torch
from lra_soft.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd
x = torch.empty(10 * 2**20)  # 40 MiB of float32
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    applied, grown = map(int, out.split())
    return applied, grown


@pytest.mark.slow  # two subprocesses, each importing torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_large_tensors_come_from_the_heap_once_tuned():
    try:
        untuned = _mmapped_bytes("plain")
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("not glibc >= 2.33")
        raise
    assert untuned[1] >= 40 * 2**20  # glibc mmaps a block this large: fresh pages at every allocation
    assert _mmapped_bytes("tuned") == (1, 0)


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    from lra_soft import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
