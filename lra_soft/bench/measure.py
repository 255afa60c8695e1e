"""Measuring primitives: wall time with warm-up and repeats, allocator-level peak memory, FLOPs and reference floors.

Every figure here is measured, never estimated:

- time: CUDA events around each call on GPU (the device is synchronised first), ``time.perf_counter`` on CPU; the
  median of ``repeats`` calls after ``warmup`` calls, with the quartiles as the spread;
- peak memory: on GPU ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the allocator's own
  allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``), replayed in time order, whose
  running sum peaks at the figure reported. Both count bytes allocated *during* the call above what was allocated
  before it (inputs, parameters and optimizer state that exist beforehand are not counted);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and the attention kernels it knows; elementwise
  work such as ``exp`` is not counted, which is the convention of the paper's FLOP figures too), plus the symmetric
  eigendecomposition that SOFT's CPU Newton path uses for large m, which the counter does not know;
- floors: this machine's float32 matrix-product rate, and the time of the 2 x ``iters`` batched m x m products of the
  Newton-Raphson iteration A_{k+1} = 2 A_k - A_k A A_k (paper Algorithm 2) alone, which no SOFT implementation that
  runs that iteration can beat (the CPU path for m >= 256 gets the same A_T from an eigendecomposition instead, so
  there the floor is the cost of the iteration it avoids, not a bound).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls."""

    median: float
    q1: float        # first quartile
    q3: float        # third quartile
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        if not samples:
            raise ValueError("no timing samples: repeats must be at least 1")
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of ``fn()``: CUDA events on GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_rounds(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2,
                repeats: int = 5) -> dict[str, Timing]:
    """Warm every function up, then time them round-robin: round r calls every function once before round r + 1.

    Interleaving makes a drifting machine load hit every function alike, so ratios between them stay meaningful.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(time_call(fn, device))
    return {k: Timing.of(v) for k, v in samples.items()}


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    return time_rounds({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    # The profiler's raw (kineto) events hold one "[memory]" record per allocation (+bytes) and free (-bytes) made by
    # the CPU allocator, with a timestamp; the per-operator FunctionEvents fold those into their parents and lose the
    # peak inside an operator, so replay the raw records.
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("torch.profiler gave no kineto results; CPU memory measurement needs torch >= 2.1 with "
                           "the kineto profiler")
    records = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    raise ValueError(f"peak memory is measured on cpu and cuda only, not {device.type!r}")


def eigh_flops(shape: tuple[int, ...], vectors: bool = True) -> int:
    """FLOPs of a symmetric eigendecomposition of matrices ``shape`` = (..., m, m) as LAPACK's divide-and-conquer
    solver (?syevd, torch.linalg.eigh's CPU path) performs it: 4/3 m^3 to reduce to tridiagonal form; with
    eigenvectors, 4/3 m^3 for the divide and conquer on the tridiagonal matrix and 2 m^3 to transform its eigenvectors
    back. The middle term is its count without deflation, which only lowers it, so this is an upper bound."""
    m, batch = shape[-1], math.prod(shape[:-2])
    return batch * ((14 if vectors else 4) * m**3 // 3)


def _flop_formulas() -> dict:
    # torch's flop counter knows the CUDA flash/efficient SDPA kernels but not the CPU flash kernel that
    # F.scaled_dot_product_attention dispatches to on CPU; count it with torch's own SDPA formulas. It knows no
    # eigendecomposition either.
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def eigh(a_shape, uplo="L", compute_v=True, *args, out_shape=None, **kwargs) -> int:
        return eigh_flops(a_shape, compute_v)

    formulas = {aten._linalg_eigh: eigh}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or not hasattr(fc, "sdpa_flop_count"):
        return formulas

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {**formulas, fwd: forward, bwd: backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn()`` as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Matrix products, convolutions, SDPA kernels (the CPU flash kernel included) and symmetric eigendecompositions
    (`eigh_flops`) are counted; elementwise work is not.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, *, size: int = 2048, warmup: int = 2, repeats: int = 5) -> float:
    """This machine's float32 rate on one ``size`` x ``size`` matrix product, in FLOP/s (2 size^3 per product)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=out), device, warmup=warmup, repeats=repeats)
    return 2 * size**3 / t.median


def newton_products(batch: int, m: int, device: torch.device, *, iters: int = 20) -> Callable[[], None]:
    """A function running the 2 x ``iters`` batched (batch, m, m) float32 products of ``iters`` Newton iterations.

    The products write into preallocated buffers and never feed back into their inputs, so the values stay bounded
    (no inf/NaN or denormal slow paths) and no allocation or elementwise pass is timed: a floor, not an implementation.
    """
    a = torch.randn(batch, m, m, device=device) / m**0.5
    z = torch.randn(batch, m, m, device=device) / m**0.5
    az, zaz = torch.empty_like(a), torch.empty_like(a)

    def products() -> None:
        for _ in range(iters):
            torch.bmm(a, z, out=az)    # A Z_k        (batch, m, m)
            torch.bmm(z, az, out=zaz)  # Z_k (A Z_k)  (batch, m, m)

    return products


def newton_products_time(batch: int, m: int, device: torch.device, *, iters: int = 20, warmup: int = 2,
                         repeats: int = 5) -> Timing:
    """Time of ``newton_products`` alone."""
    return time_fn(newton_products(batch, m, device, iters=iters), device, warmup=warmup, repeats=repeats)
