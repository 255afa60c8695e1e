"""The measured padding-invariance error of every registered attention, as a table.

    python scripts/padding_table.py

For every variant and small-option case of ``tests/test_attention_contract.py``: a batch of sequences of lengths
n, ceil(n / 2) and 1 is padded again to twice its length with random tokens and new random content in its padded
positions; the table gives the largest change of a valid output, absolute and relative to the largest valid output,
in train and eval mode (float32). First at the test sizes (dim 16, n 13 and 3), then in an LRA-sized layer (dim 64,
2 heads, lengths 1000 / 500 / 1 padded to 2000; each variant with its defaults). The test file asserts the bound in
float64, where rounding cannot hide a leak; this script measures float32, whose rounding depends on the CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_attention_contract import CASES, DIM, IDS, LENGTHS, padding_invariance_error  # noqa: E402


def main() -> None:
    print("padding invariance, max |change| of a valid output (float32), absolute (relative to the largest output)")
    for n, dim, lra_defaults in [*((n, DIM, False) for n in LENGTHS), (1000, 64, True)]:
        for (name, options), case in zip(CASES, IDS):
            if lra_defaults and options:
                continue
            results = []
            for mode in ("train", "eval"):
                for relative in (False, True):
                    torch.manual_seed(0)
                    results.append(padding_invariance_error(name, options, n, mode, dim=dim, relative=relative))
            print(f"{case:<36} n={n:<5} dim={dim:<3} train {results[0]:.2e} (rel {results[1]:.1e})  "
                  f"eval {results[2]:.2e} (rel {results[3]:.1e})", flush=True)


if __name__ == "__main__":
    main()
