"""The glibc allocator tuning: a 40 MiB tensor is served by mmap (page-faulted afresh at every allocation) without it
and from the reusable heap with it. The CLI applies it at start; `soft_attention` applies it lazily at its first CPU
call, never at import, unless opted out. Checked in subprocesses through glibc's own mallinfo2 counters."""
import json
import os
import subprocess
import sys

import pytest

PRELUDE = r"""
import ctypes, json, sys, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2


def mmapped_bytes():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(10 * 2**20)  # 40 MiB of float32: above glibc's largest dynamic mmap threshold
    return libc.mallinfo2().hblkhd - before
"""

EXPLICIT = PRELUDE + r"""
from lra_soft.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
print(int(applied), mmapped_bytes())
"""

LAZY = PRELUDE + r"""
import lra_soft.attention  # the registry imports every variant, SOFT included
from lra_soft import allocator
from lra_soft.attention.soft import soft_attention

if sys.argv[1] == "function":
    allocator.set_lazy_tuning(False)
at_import = (allocator.tuned, mmapped_bytes())
q = torch.randn(1, 1, 8, 4)
soft_attention(q, q, inverse="solve")
print(json.dumps({"at_import": at_import, "after_call": (allocator.tuned, mmapped_bytes())}))
"""


def _run(script: str, arg: str, env: dict | None = None) -> str:
    try:
        return subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, check=True,
                              env={**os.environ, **(env or {})}).stdout
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("not glibc >= 2.33")
        raise


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
BIG = 40 * 2**20


@pytest.mark.slow  # two subprocesses, each importing torch
@glibc_only
def test_large_tensors_come_from_the_heap_once_tuned():
    applied, grown = map(int, _run(EXPLICIT, "plain").split())
    assert grown >= BIG  # glibc mmaps a block this large: fresh pages at every allocation
    assert list(map(int, _run(EXPLICIT, "tuned").split())) == [1, 0]


@pytest.mark.slow  # a subprocess importing torch
@glibc_only
def test_soft_attention_tunes_at_its_first_cpu_call_not_at_import():
    out = json.loads(_run(LAZY, "default", {"LRA_SOFT_MALLOC_TUNING": "1"}))
    assert out["at_import"][0] is False and out["at_import"][1] >= BIG  # importing the library changed nothing
    assert out["after_call"] == [True, 0]


@pytest.mark.slow  # a subprocess importing torch
@glibc_only
@pytest.mark.parametrize("how, env", [("env", {"LRA_SOFT_MALLOC_TUNING": "0"}), ("function", {})])
def test_the_lazy_tuning_can_be_opted_out(how, env):
    out = json.loads(_run(LAZY, how, env))
    assert out["after_call"][0] is False and out["after_call"][1] >= BIG  # still mmapped after the call


@pytest.fixture
def fresh_allocator(monkeypatch):
    """The allocator module as in a new process, with keep_freed_memory recorded instead of applied."""
    from lra_soft import allocator

    calls = []
    monkeypatch.setattr(allocator, "tuned", False)
    monkeypatch.setattr(allocator, "_lazy", True)
    monkeypatch.setattr(allocator, "_first_cpu_use_seen", False)
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.delenv(allocator.ENV, raising=False)
    return allocator, calls


def test_lazy_tuning_waits_for_a_cpu_tensor_and_runs_once(fresh_allocator):
    allocator, calls = fresh_allocator
    allocator.tune_on_first_cpu_use("meta")
    allocator.tune_on_first_cpu_use("cuda")
    assert calls == []
    allocator.tune_on_first_cpu_use("cpu")
    allocator.tune_on_first_cpu_use("cpu")
    assert calls == [1]


def test_lazy_tuning_leaves_an_explicit_tuning_alone(fresh_allocator):
    allocator, calls = fresh_allocator
    allocator.tuned = True  # e.g. the CLI tuned at start
    allocator.tune_on_first_cpu_use("cpu")
    assert calls == []


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    from lra_soft import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
    assert allocator.release_freed_memory() is False


def test_the_cli_flag_turns_both_tunings_off(fresh_allocator):
    """`--no-malloc-tuning` means untuned: the CLI does not tune at start, and soft_attention's first CPU call does
    not either; the default tunes at start."""
    from typer.testing import CliRunner

    from cli import app

    allocator, calls = fresh_allocator
    assert CliRunner().invoke(app, ["--no-malloc-tuning", "attentions"]).exit_code == 0
    allocator.tune_on_first_cpu_use("cpu")
    assert calls == [] and allocator._lazy is False
    assert CliRunner().invoke(app, ["attentions"]).exit_code == 0
    assert calls == [1]
