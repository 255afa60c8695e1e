"""The installed package: the `lra-soft` command equals `python cli.py`, `tasks` imports outside the checkout, and
the optional Hugging Face dependency fails with the extra to install."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).parent / ("lra-soft.exe" if os.name == "nt" else "lra-soft")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.skipif(not COMMAND.exists(), reason="lra-soft is not installed in this environment (pip install -e .)")
def test_installed_command_equals_cli_py_outside_the_checkout(tmp_path):
    ours = subprocess.run([str(COMMAND), "tasks"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                          timeout=120)
    direct = subprocess.run([sys.executable, "cli.py", "tasks"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == direct.stdout and "listops" in ours.stdout
    bad = subprocess.run([str(COMMAND), "train", "nosuchtask"], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "nosuchtask" in bad.stdout + bad.stderr


@pytest.mark.skipif(not COMMAND.exists(), reason="lra-soft is not installed in this environment (pip install -e .)")
def test_packages_import_outside_the_checkout(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import tasks, lra_soft, cli; print(sorted(tasks.TASKS))"], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "listops" in done.stdout


def test_missing_datasets_names_the_extra(monkeypatch):
    from tasks import _sources
    from tasks._common import DataError

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'lra-soft\[hf\]'"):
        _sources._datasets()
