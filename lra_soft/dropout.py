"""Dropout that is fast on the CPU: the keep mask comes from cheap random integers instead of ``bernoulli_``.

Why: on a 2-core Xeon CPU, torch's ``F.dropout(x, 0.1, True)`` on a (32, 2048, 128) float32 tensor takes
~77 ms, ~60 ms of it in ``bernoulli_`` (~8 ns an element), and ``aten::bernoulli_`` was 35% of a whole training step
of the LRA encoder (batch 32, n 2048, dim 64). Random integers are far cheaper, and one 64-bit draw of the generator
holds the bits for four elements.

How: ``random_()`` without arguments on an integer dtype fills each element with ``v % (max + 1)`` of one generator
output ``v``, so int16 gives [0, 2^15 - 1] (15 uniform bits), int32 [0, 2^31 - 1] (31 bits, one 32-bit output) and
int64 [0, 2^63 - 1] (63 bits, one 64-bit output); checked on 4e6 draws each. We draw int64 with
``torch.randint(-2**62, 2**62)``, i.e. ``v % 2^63 - 2^62``: bits 0..62 are those of ``random_()``'s 63 uniform bits
(bit 62 flipped), and unlike ``random_()`` dynamo traces it. Viewed as int16, an int64 is four 16-bit fields whose
low 15 bits are uniform and independent, so ``& 0x7FFF`` gives four uniform integers r in [0, 2^15) per draw: two
32-bit generator outputs for four elements, where ``random_()`` on int16 spends one an element. An element is dropped
when r < t with

    t = round(p * 2^15),    kept elements scaled by 1 / (1 - t / 2^15),

so E[output] = x exactly and the drop probability is p quantized to 2^-15: 0.1 -> 3277 / 32768 = 0.100006,
0.5 -> 0.5 exactly, and any p whose t is 0 or 2^15 (p <= 2^-16 or p >= 1 - 2^-16) goes to torch's own dropout.

The mask is saved as bool (1 byte an element, a quarter of a float32 mask) by an autograd Function whose backward
applies the same mask and scale. Integers come from the CPU default generator, so ``torch.manual_seed`` repeats the
masks and a restored ``torch.get_rng_state()`` resumes them; the masks differ from ``nn.Dropout``'s for one seed.
Off the CPU (CUDA's fused dropout is already fast), outside training and for p == 0 this is ``F.dropout``.

Measured on a 2-core Xeon CPU at p = 0.1, float32, min of 5 interleaved calls each, the table three times (ranges):
``.venv/bin/python -c "from lra_soft.bench.dropout import benchmark; benchmark()"``

    (32, 2048, 64)   forward            F.dropout 31-33 ms    this 9.9-10.2 ms
    (32, 2048, 64)   forward+backward   F.dropout 34-35 ms    this 13.4-13.8 ms
    (32, 2048, 128)  forward            F.dropout 70-73 ms    this 20.3-20.6 ms
    (32, 2048, 128)  forward+backward   F.dropout 70-84 ms    this 28.5-37 ms

and a whole encoder training step (Nystrom attention, batch 32, n 2048, dim 64, forward+backward) went from 1551 to
1205 ms with ``nn.Dropout`` swapped for this one.

The elementwise form was chosen by timing (8.4M float32, min of 5): ``keep.to(x.dtype).mul_(x).mul_(scale)`` 14 ms,
``torch.where(~keep, 0, x).mul_(scale)`` 17 ms (``where`` alone costs 16 ms against 10 ms for ``x * scale``: most of
those 10 ms are page faults of the fresh output), ``x.mul(keep.to(x.dtype)).mul_(scale)`` 22 ms and ``x.mul(keep)``
(promotion from bool) slower still. Like ``F.dropout``, a dropped NaN or inf stays NaN (0 * inf).

Under ``torch.compile`` the Function is traced without a graph break (``torch._dynamo.explain``); inductor then draws
with its own generator, so compiled masks differ from eager ones for one seed (the drop rate is the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BITS = 15                    # uniform bits per element: the low 15 bits of each 16-bit field of a random int64
LEVELS = 1 << BITS


def quantize(p: float) -> tuple[int, float]:
    """Drop probability p -> (threshold t, keep scale): drop when r < t for r uniform in [0, 2^15)."""
    t = round(p * LEVELS)
    return t, (LEVELS / (LEVELS - t) if t < LEVELS else float("inf"))


def uniform15(shape: torch.Size, device: torch.device) -> Tensor:
    """Independent uniform integers in [0, 2^15) of ``shape`` (int16), four per int64 draw of the default generator."""
    numel = shape.numel()
    # randint rather than random_(): the same bits, but random_ is a dynamo graph break; ~1 ms more per 8M elements.
    words = torch.randint(-2**62, 2**62, ((numel + 3) // 4,), dtype=torch.int64, device=device)  # bits 0..62 uniform
    return words.view(torch.int16).bitwise_and_(LEVELS - 1)[:numel].view(shape)


class _MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - t / 2^15), saving only the bool keep mask for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: int, scale: float, inplace: bool) -> Tensor:
        keep = uniform15(x.shape, x.device) >= threshold  # bool, shaped like x
        # x * 1.0 is x exactly, so multiplying by the 0/1 mask and then by scale is where(keep, x, 0) * scale, faster.
        out = x.mul_(keep.to(x.dtype)) if inplace else keep.to(x.dtype).mul_(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return keep.to(grad.dtype).mul_(grad).mul_(ctx.scale), None, None, None


def dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout`` with the same signature; on the CPU the mask is drawn from 15-bit integers (module docstring)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    threshold, scale = quantize(p)
    # torch's own dropout where it is fast (CUDA), a no-op, or where 15 bits cannot express p (p quantizes to 0 or 1).
    if not training or x.device.type != "cpu" or not x.is_floating_point() or not 0 < threshold < LEVELS:
        return F.dropout(x, p, training, inplace)
    return _MaskedScale.apply(x, threshold, scale, inplace)


class Dropout(nn.Dropout):
    """Drop-in ``nn.Dropout``: torch's constructor, p validation, ``extra_repr`` and (empty) state_dict; the faster
    CPU ``dropout`` above in ``forward``. Subclassing keeps ``isinstance(m, nn.Dropout)`` true for code that looks
    for dropout layers."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.inplace)

