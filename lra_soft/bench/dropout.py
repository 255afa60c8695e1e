"""The timing behind ``lra_soft.dropout``'s docstring table: ``F.dropout`` against ``lra_soft.dropout.dropout`` at
p = 0.1 on the CPU.

    .venv/bin/python -c "from lra_soft.bench.dropout import benchmark; benchmark()"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lra_soft.bench.measure import time_rounds
from lra_soft.dropout import dropout


def _call(fn, x: Tensor, backward: bool):
    """One timed call: ``fn(x, 0.1, True)``, then its gradient when ``backward`` (any gradient shaped like x does)."""
    if backward:
        return lambda: torch.autograd.grad(fn(x, 0.1, True), x, x.detach())
    return lambda: fn(x, 0.1, True)


def benchmark(repeats: int = 3) -> None:
    """F.dropout against ``dropout`` at p = 0.1 on the CPU, interleaved, min of 5 calls; the whole table ``repeats``
    times."""
    for repeat in range(repeats):
        for shape in ((32, 2048, 64), (32, 2048, 128)):
            x = torch.randn(shape, requires_grad=True)
            for name, backward in (("forward", False), ("forward+backward", True)):
                t = time_rounds({"torch": _call(F.dropout, x, backward), "ours": _call(dropout, x, backward)},
                                torch.device("cpu"))
                ref, ours = 1e3 * t["torch"].min, 1e3 * t["ours"].min
                print(f"repeat {repeat}  {shape!s:16} {name:17} F.dropout {ref:6.1f} ms   "
                      f"lra_soft.dropout {ours:6.1f} ms   x{ref / ours:.2f}", flush=True)
