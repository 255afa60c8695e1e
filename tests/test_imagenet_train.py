"""`cli.py imagenet train / eval / summary` on a tiny ImageFolder made here; exact resume; schedule; weight decay."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from lra_soft.checkpoint import load_checkpoint
from lra_soft.imagenet.train import ImageNetConfig, lr_factor, param_groups, train
from lra_soft.vision import build_model

runner = CliRunner()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes, 4 train and 2 val images each, of assorted sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (36 + 3 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg" if i % 2 else root / split / c / f"{i}.png")
    return root


SMOKE = ["--img-size", "32", "--global-batch", "4", "--micro-batch", "2", "--epochs", "1", "--warmup-epochs", "0",
         "--max-steps", "2", "--workers", "0", "--device", "cpu", "--ema-decay", "0.9"]


@pytest.mark.slow  # trains, evaluates and summarises through the CLI
def test_cli_train_two_steps_then_eval(image_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["imagenet", "train", "--data", str(image_folder), "--out", str(out), *SMOKE])
    assert result.exit_code == 0, result.output
    assert "step 2, val top-1" in result.output
    state = load_checkpoint(out / "last.pt")  # weights_only=True
    assert state["step"] == 2 and state["ema"] is not None and state["classes"] == ["n01", "n02", "n03"]
    assert {"config.json", "metrics.jsonl", "results.json", "last.pt", "best.pt"} <= {p.name for p in out.iterdir()}

    result = runner.invoke(app, ["imagenet", "eval", str(out / "last.pt"), "--data", str(image_folder), "--device",
                                 "cpu", "--workers", "0", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "on 6 images (ema weights" in result.output
    assert f"top-1 {state['metrics']['ema_top1']:.2f}%" in result.output  # same weights, same split, same number


def test_cli_reports_bad_input(image_folder, tmp_path):
    result = runner.invoke(app, ["imagenet", "train", "--data", str(tmp_path / "nowhere"), *SMOKE])
    assert result.exit_code == 1 and "ImageFolder layout" in result.output
    result = runner.invoke(app, ["imagenet", "train", "--data", str(image_folder), *SMOKE[:4], "--global-batch",
                                 "6", "--micro-batch", "4"])
    assert result.exit_code == 1 and "not a multiple of --micro-batch" in result.output
    result = runner.invoke(app, ["imagenet", "train", "--data", str(image_folder), *SMOKE, "-o", "dpeths=(1,1,1,1)"])
    assert result.exit_code == 1 and "unknown VisionConfig field(s) ['dpeths']" in result.output
    result = runner.invoke(app, ["imagenet", "eval", str(tmp_path / "none.pt"), "--data", str(image_folder)])
    assert result.exit_code == 1 and "does not exist" in result.output


@pytest.mark.slow  # three short trainings
def test_resume_continues_exactly(image_folder, tmp_path):
    """Two steps in one go == one step, stop, resume, one more step (workers=0: every random draw is restored)."""
    cfg = ImageNetConfig(img_size=32, global_batch=4, micro_batch=2, epochs=2, warmup_epochs=1, workers=0,
                         ema_decay=0.5)
    small = dict(dims=(16, 32, 32, 64), heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))  # the loop, not the model, is tested
    train(replace(cfg, max_steps=3), image_folder, tmp_path / "straight", device="cpu", **small)
    train(replace(cfg, max_steps=2), image_folder, tmp_path / "split", device="cpu", **small)
    train(replace(cfg, max_steps=3), image_folder, tmp_path / "split", device="cpu", resume=True, **small)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 3 and a["epoch"] == b["epoch"] == 1  # 3 steps per epoch: step 3 ends epoch 0
    for key in ("model", "ema"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, msg=f"{key}.{name} differs after resume")


def test_schedule_warmup_then_cosine():
    kw = dict(warmup_steps=10, total_steps=110, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert math.isclose(lr_factor(0, **kw) * 1e-3, 1e-6)
    assert math.isclose(lr_factor(5, **kw) * 1e-3, 1e-6 + 0.5 * (1e-3 - 1e-6))
    assert math.isclose(lr_factor(10, **kw), 1.0)
    assert math.isclose(lr_factor(60, **kw) * 1e-3, 1e-5 + 0.5 * (1e-3 - 1e-5))
    assert math.isclose(lr_factor(110, **kw) * 1e-3, 1e-5)


def test_no_weight_decay_on_biases_norms_positions_cls():
    model = build_model("soft_tiny", num_classes=10, img_size=64)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert all(names[id(p)].endswith(("weight",)) for p in decay["params"])
    assert "stages.3.cls_token" in skipped and "stages.0.pos_embed" in skipped and "head.bias" in skipped
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.slow  # torchrun: two processes
def test_torchrun_two_processes(image_folder, tmp_path):
    """DDP on CPU (gloo): `torchrun --nproc_per_node 2 cli.py imagenet train` with 2 micro-batches per process (no_sync
    on the first), 1 step per epoch; each evaluation counts every image once over the two ranks' shards."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "cli.py",
           "imagenet", "train", "--data", str(image_folder), "--out", str(out), *SMOKE, "--global-batch", "8",
           "--epochs", "2", "-o", "dims=(16, 32, 32, 64)", "-o", "heads=(1, 2, 2, 4)", "-o", "depths=(1, 1, 1, 1)"]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "on 6 images" in done.stdout  # the two ranks' val shards add up to the whole split
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 2 and state["epoch"] == 2 and len(state["rng"]) == 2  # one RNG state per process
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow  # a DataLoader worker process
def test_a_bad_image_read_in_a_worker_is_one_line(image_folder, tmp_path):
    """torch re-raises a worker's error with the worker's whole traceback in its message; the CLI prints one line:
    the worker's own message (naming the image) and which worker."""
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(image_folder, root)
    for image in (root / "train").rglob("*.*"):
        image.write_bytes(b"not an image")
    args = [a if a != "0" or SMOKE[i - 1] != "--workers" else "1" for i, a in enumerate(SMOKE)]
    result = runner.invoke(app, ["imagenet", "train", "--data", str(root), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(in DataLoader worker process 0)" in lines[0], lines
    assert str(root / "train") in lines[0] and "Traceback" not in result.output
