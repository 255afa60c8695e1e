"""scripts/gpu_check.sh at tiny sizes on CPU, so that the one-command GPU check cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    parts = [line.split(":")[0] for line in lines]
    assert parts == ["setup", "1 pytest -m gpu", "2 bench", "3 timm soft_tiny", "4 listops softmax",
                     "4 listops soft", "done in " + lines[-1].split("done in ")[1].split(":")[0]]
    assert all("FAILED" not in line for line in lines), lines
    rows = json.loads((out / "bench" / "lra-shapes.json").read_text())["rows"]
    assert {r["attention"] for r in rows} == {"softmax", "soft", "soft:num_landmarks=64", "nystrom"}
    assert all(r["fwdbwd_ms"] > 0 for r in rows)
    for attn in ("softmax", "soft"):
        res = json.loads((out / "listops" / attn / "results.json").read_text())
        assert res["protocol"] == "paper" and res["steps"] == 2 and not res["comparable"]
        assert not list((out / "listops" / attn).glob("*.pt"))  # checkpoints stay behind


def test_gpu_check_rejects_a_bad_device():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "tpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--device must be cuda or cpu, got 'tpu'" in proc.stderr


def test_the_gpu_tests_collect_with_only_the_accelerator_image_packages():
    """The GPU machine has torch, timm, torchvision, typer, tqdm, matplotlib, pillow and pytest, and none of the [dev]
    extra: `pytest -m gpu tests` must collect there (one test module that imports hypothesis unguarded would stop
    part 1 at collection)."""
    absent = ("hypothesis", "datasets", "tensorflow_datasets", "tensorflow", "pyarrow", "submitit")
    code = ("import sys\n"
            f"for name in {absent!r}:\n    sys.modules[name] = None  # import fails as if not installed\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-m', 'gpu', '--collect-only', '-p', 'no:cacheprovider', 'tests']))")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # hypothesis's own pytest plugin is absent there too
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
