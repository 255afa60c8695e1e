"""scripts/init_scale.py on the committed ListOps fixture: it runs, and it measures what its docstring says (SOFT's
unnormalised kernel sums grow the first attention output with the number of tokens, softmax's average does not,
and the gradient along the first residual path shrinks with it)."""
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int) -> dict[str, list[float]]:
    command = [sys.executable, "scripts/init_scale.py", "data/fixtures/listops", "--n", str(n), "--batch", "2",
               "--attn", "softmax", "--attn", "soft:num_landmarks=4", "--attn", "soft:sampling=random,num_landmarks=4"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"n = {n}, 2 test examples") and len(lines) == 5, out
    return {line.split()[0]: [float("nan") if v == "-" else float(v) for v in line.split()[1:]] for line in lines[2:]}


def test_init_scale_measures_the_kernel_sum():
    short, long = _rows(8), _rows(32)
    for rows in (short, long):
        assert set(rows) == {"softmax", "soft:num_landmarks=4", "soft:sampling=random,num_landmarks=4"}
        assert all(-1 <= c <= 1 for r in rows.values() for c in r[1:3])
    soft, softmax = "soft:num_landmarks=4", "softmax"
    # truncated to 32 tokens the fixture's two examples hold about 3x the real tokens of 8: SOFT's output grows with
    # them (measured 11.7 -> 21.6), softmax's average does not (6.7 -> 4.2)
    assert long[soft][0] > 1.5 * short[soft][0]
    assert long[softmax][0] < 1.2 * short[softmax][0]
    assert long[soft][0] > 3 * long[softmax][0]
    # the gradient reaching the token embeddings along the first residual path: SOFT's share of softmax's shrinks
    # as its output grows (measured 0.71 at 8 tokens, 0.19 at 32)
    assert all(r[3] > 0 and r[4] > 0 for rows in (short, long) for r in rows.values())
    assert long[soft][4] < 0.5 * long[softmax][4]
    assert long[soft][4] / long[softmax][4] < 0.5 * short[soft][4] / short[softmax][4]


def test_init_scale_measures_how_alike_the_landmarks_are():
    rows = _rows(32)
    assert math.isnan(rows["softmax"][5])  # no landmarks
    pooled, random = rows["soft:num_landmarks=4"][5], rows["soft:sampling=random,num_landmarks=4"][5]
    assert 1 <= pooled <= 4 and 1 <= random <= 4
    # means of 8-token segments are closer to each other than single tokens are (measured 1.59 against 3.44)
    assert random > 1.5 * pooled


def test_effective_rank_runs_from_one_coincident_landmark_to_m_separate_ones():
    effective_rank = runpy.run_path(str(ROOT / "scripts" / "init_scale.py"))["effective_rank"]  # not __main__
    m = 5
    assert effective_rank(torch.ones(m, m)).item() == pytest.approx(1.0)
    assert effective_rank(torch.eye(m)).item() == pytest.approx(m)
    two_groups = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3))  # two clusters of coincident landmarks
    assert 1.5 < effective_rank(two_groups).item() < 2.0  # (2 + 3)^2 / (4 + 9) = 1.92


def test_init_scale_names_a_missing_folder(tmp_path):
    done = subprocess.run([sys.executable, "scripts/init_scale.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 2 and "basic_test.tsv does not exist" in done.stderr
