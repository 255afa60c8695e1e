"""Attention-level benchmark: one registry module, forward and forward+backward, time and peak memory, against length.

The protocol follows the efficiency tables that SOFT is compared in (paper Figure 1b, Table 1; Nystromformer Table 1:
one attention module, memory and time against n): for every length, every chosen attention is built at
dim = heads x head_dim and timed on the same input. Timed calls are interleaved round-robin over the attentions of one
length (round r times every attention once before round r+1 starts), so a machine whose load drifts slows every row
alike and the ratios to ``softmax`` stay meaningful on a shared machine. Reference floors (the Newton products of
every SOFT row, see ``measure.newton_products_time``) take part in the same rounds.

Forward is timed in eval mode under ``torch.no_grad`` (inference); forward+backward in train mode with the input
requiring a gradient and a fixed output gradient, parameter and input gradients cleared (set to None) before each call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lra_soft.attention import build_attention
from lra_soft.bench.measure import Timing, count_flops, matmul_rate, newton_products, peak_memory, time_rounds
from lra_soft.bench.specs import AttentionSpec
from lra_soft.distributed import resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AttentionBenchConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    batch: int = 8                  # the CPU setting of docs/bench: batch 8, 2 heads, head dim 32
    heads: int = 2
    head_dim: int = 32
    dtype: str = "float32"          # parameters and inputs
    autocast: str = "none"          # "bfloat16" / "float16": run under torch.autocast (GPU mixed precision)
    device: str = "auto"            # auto = cuda if available, else cpu
    mask: bool = False              # pass a padding mask (sequence i keeps n - i n / (2 batch) valid tokens)
    warmup: int = 2                 # untimed calls per case before timing
    repeats: int = 5                # timed calls per case; the median is reported, quartiles as spread
    compile: bool = False           # also time torch.compile'd modules (rows with compiled=True)
    compile_backend: str = "inductor"
    memory: bool = True             # measure peak memory (one extra call per case and mode)
    flops: bool = True              # count forward+backward FLOPs with FlopCounterMode
    floors: bool = True             # time the Newton products of every soft/newton row and this machine's matmul rate
    matmul_size: int = 0            # side of the square float32 product for the machine's rate; 0: 2048 CPU, 8192 GPU

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; choose from {sorted(DTYPES)}")
        if self.autocast not in {"none", "bfloat16", "float16"}:
            raise ValueError(f"autocast {self.autocast!r} unknown; choose none, bfloat16 or float16")
        if min(self.batch, self.heads, self.head_dim, self.repeats) < 1 or self.warmup < 0:
            raise ValueError("batch, heads, head_dim and repeats must be >= 1 and warmup >= 0")


def landmark_count(spec: AttentionSpec, n: int) -> int | None:
    """m, the number of bottleneck tokens a landmark attention uses at length n (None for the others)."""
    opts = spec.resolved()
    if opts.get("num_landmarks"):
        return min(int(opts["num_landmarks"]), n)
    if opts.get("window"):
        return math.ceil(n / int(opts["window"]))
    return None


def newton_iterations(spec: AttentionSpec) -> int | None:
    """Newton iterations of a ``soft`` row with ``inverse=newton`` (the rows that have a Newton floor), else None."""
    opts = spec.resolved()
    if spec.name == "soft" and opts.get("inverse") == "newton":
        return int(opts.get("iters", 20))
    return None


def padding_mask(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Sequence i keeps its first n - i n / (2 batch) tokens: lengths spread from n down to about n / 2."""
    valid = n - (torch.arange(batch, device=device) * n) // (2 * batch)  # (b,)
    return torch.arange(n, device=device)[None, :] < valid[:, None]      # (b, n)


class _Case:
    """One attention at one length, compiled or not: its module, input and the two timed closures."""

    def __init__(self, spec: AttentionSpec, n: int, cfg: AttentionBenchConfig, device: torch.device, compiled: bool):
        self.spec, self.n, self.compiled = spec, n, compiled
        dim = cfg.heads * cfg.head_dim
        dtype = DTYPES[cfg.dtype]
        self.module = build_attention(spec.name, dim, cfg.heads, max_len=n, **spec.options).to(device, dtype)
        self.run_module: nn.Module | Callable = self.module
        if compiled:
            self.run_module = torch.compile(self.module, backend=cfg.compile_backend)
        self.x = torch.randn(cfg.batch, n, dim, device=device, dtype=dtype)        # (b, n, dim)
        self.grad = torch.randn(cfg.batch, n, dim, device=device, dtype=dtype)     # (b, n, dim)
        self.mask = padding_mask(cfg.batch, n, device) if cfg.mask else None      # (b, n)
        self.amp_dtype = DTYPES.get(cfg.autocast)  # None: no autocast

    def forward(self) -> None:
        self.module.eval()
        with torch.no_grad(), self._amp():
            self.run_module(self.x, self.mask)

    def clear_grads(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def forward_backward(self) -> None:
        self.module.train()
        self.clear_grads()
        x = self.x.detach().requires_grad_(True)
        with self._amp():
            out = self.run_module(x, self.mask)
        out.backward(self.grad.to(out.dtype))

    def _amp(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.x.device.type, dtype=self.amp_dtype)


def graph_breaks(case: _Case) -> dict[str, Any]:
    """Graphs and graph breaks that dynamo finds in the module's training forward (``torch._dynamo.explain``)."""
    try:
        case.module.train()
        with case._amp():
            info = torch._dynamo.explain(case.module)(case.x, case.mask)
    except Exception as err:  # noqa: BLE001 - explain is a diagnostic; its failure must not end the benchmark
        return {"graph_breaks": None, "graph_break_error": f"{type(err).__name__}: {err}"[:200]}
    return {"graphs": info.graph_count, "graph_breaks": info.graph_break_count,
            "graph_break_reasons": sorted({str(b.reason).splitlines()[0][:160] for b in info.break_reasons})}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) or \
        "out of memory" in str(err).lower()


def _case_row(case: _Case, cfg: AttentionBenchConfig, device: torch.device) -> dict[str, Any]:
    return {
        "attention": case.spec.label, "name": case.spec.name, "options": case.spec.resolved(),
        "compiled": case.compiled, "n": case.n, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim,
        "dtype": cfg.dtype, "autocast": cfg.autocast, "mask": cfg.mask, "device": str(device),
        "m": landmark_count(case.spec, case.n),
    }


def _timing_fields(prefix: str, t: Timing) -> dict[str, float]:
    return {f"{prefix}_ms": t.median * 1e3, f"{prefix}_ms_q1": t.q1 * 1e3, f"{prefix}_ms_q3": t.q3 * 1e3}


def bench_length(specs: list[AttentionSpec], n: int, cfg: AttentionBenchConfig, device: torch.device,
                 log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """All rows of one length: every spec (eager, and compiled if asked), plus the Newton floors of soft/newton rows."""
    if cfg.compile:
        torch.compiler.reset()  # one compiled module per case would otherwise exhaust dynamo's recompile limit
    cases, rows, failed = [], {}, []
    for spec in specs:
        for compiled in ([False, True] if cfg.compile else [False]):
            key = f"{spec.label}|{'compiled' if compiled else 'eager'}"
            try:
                case = _Case(spec, n, cfg, device, compiled)
                case.forward()  # fails fast (and compiles) before the timed rounds
                case.forward_backward()
            except Exception as err:  # noqa: BLE001 - out of memory, or torch.compile failing, is a result
                if not (_is_oom(err) or compiled):
                    raise
                reason = "out of memory" if _is_oom(err) else f"torch.compile failed: {type(err).__name__}: " \
                    f"{str(err).splitlines()[0] if str(err) else ''}"
                failed.append({"attention": spec.label, "name": spec.name, "options": spec.resolved(),
                               "compiled": compiled, "n": n, "device": str(device), "error": reason})
                log(f"{key} n={n}: {reason}; skipped")
                continue
            cases.append((key, case))
            rows[key] = _case_row(case, cfg, device)
            if compiled:
                rows[key].update(graph_breaks(case))
    fns: dict[str, Callable[[], Any]] = {}
    for key, case in cases:
        fns[f"{key}|fwd"] = case.forward
        fns[f"{key}|fwdbwd"] = case.forward_backward
    floors = {}
    if cfg.floors:
        for spec in specs:
            iters, m = newton_iterations(spec), landmark_count(spec, n)
            if iters is not None and m is not None and (m, iters) not in floors.values():
                floors[f"floor|{m}|{iters}"] = (m, iters)
        for key, (m, iters) in floors.items():
            fns[key] = newton_products(cfg.batch * cfg.heads, m, device, iters=iters)
    log(f"n={n}: timing {len(fns)} functions x {cfg.repeats} rounds")
    timings = time_rounds(fns, device, warmup=cfg.warmup, repeats=cfg.repeats)
    for key, case in cases:
        row = rows[key]
        row.update(_timing_fields("fwd", timings[f"{key}|fwd"]))
        row.update(_timing_fields("fwdbwd", timings[f"{key}|fwdbwd"]))
        if cfg.memory:
            # Gradients left from the previous call are freed before, not inside, the measured call.
            case.clear_grads()
            row["fwd_mem_mb"] = peak_memory(case.forward, device) / 2**20
            row["fwdbwd_mem_mb"] = peak_memory(case.forward_backward, device) / 2**20
        if cfg.flops and not case.compiled:
            flops = count_flops(case.forward_backward)
            row["fwdbwd_gflop"] = flops / 1e9
            row["fwdbwd_gflops_per_s"] = flops / 1e9 / (row["fwdbwd_ms"] / 1e3)
        iters, m = newton_iterations(case.spec), row["m"]
        if iters is not None and f"floor|{m}|{iters}" in timings:
            floor = timings[f"floor|{m}|{iters}"]
            row["newton_floor_ms"] = floor.median * 1e3
            row["fwdbwd_x_newton_floor"] = row["fwdbwd_ms"] / row["newton_floor_ms"]
    return [rows[key] for key, _ in cases] + failed


def add_ratios(rows: list[dict[str, Any]], baseline: str = "softmax") -> None:
    """Time and memory of every row relative to the ``baseline`` row of the same length and compile mode (in place)."""
    base = {(r["n"], r["compiled"]): r for r in rows if r["attention"] == baseline and "error" not in r}
    for r in rows:
        b = base.get((r["n"], r["compiled"]))
        if b is None or "error" in r:
            continue
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_mem_mb", "fwdbwd_mem_mb"):
            if key in r and key in b and b[key] > 0:
                r[f"{key.rsplit('_', 1)[0]}_x_{baseline}"] = r[key] / b[key]


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attention: t and memory at the longest length over the shortest, and the fitted exponent k of t ~ n^k."""
    out = []
    for label, compiled in dict.fromkeys((r["attention"], r["compiled"]) for r in rows):
        mine = sorted((r for r in rows if r["attention"] == label and r["compiled"] == compiled and "error" not in r),
                      key=lambda r: r["n"])
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        entry = {"attention": label, "compiled": compiled, "n_lo": lo["n"], "n_hi": hi["n"],
                 "n_ratio": hi["n"] / lo["n"]}
        for key in ("fwdbwd_ms", "fwdbwd_mem_mb"):
            if key in lo and lo[key] > 0 and hi[key] > 0:
                entry[f"{key}_ratio"] = hi[key] / lo[key]
                entry[f"{key}_exponent"] = _slope([r["n"] for r in mine], [r[key] for r in mine])
        out.append(entry)
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / var if var else float("nan")


def run_attention_bench(specs: list[AttentionSpec], cfg: AttentionBenchConfig,
                        log: Callable[[str], None] = lambda s: None,
                        progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> dict[str, Any]:
    """The whole attention-level run: reference rate, every length, ratios and growth; a JSON-ready dict.

    ``log`` receives progress messages, ``progress`` wraps the loop over lengths (e.g. a tqdm bar).
    """
    device = resolve_device(cfg.device)
    reference: dict[str, Any] = {}
    if cfg.floors:
        size = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)  # big enough to reach the peak rate
        log(f"measuring the float32 matmul rate ({size}^2)")
        reference["matmul_size"] = size
        reference["matmul_gflops_per_s"] = matmul_rate(device, size=size, repeats=cfg.repeats) / 1e9
    rows: list[dict[str, Any]] = []
    for n in progress(cfg.lengths):
        rows += bench_length(specs, n, cfg, device, log)
    if cfg.floors:  # measured again at the end: the spread of the two is the noise of the rate on a shared machine
        after = matmul_rate(device, size=size, repeats=cfg.repeats) / 1e9
        reference["matmul_gflops_per_s_end"] = after
        rate = max(reference["matmul_gflops_per_s"], after)
        for r in rows:
            if "fwdbwd_gflops_per_s" in r:
                r["fwdbwd_fraction_of_matmul_rate"] = r["fwdbwd_gflops_per_s"] / rate
    add_ratios(rows)
    return {"mode": "attention", "config": asdict(cfg), "device": str(device),
            "specs": [asdict(s) for s in specs], "reference": reference, "rows": rows, "growth": growth(rows)}
