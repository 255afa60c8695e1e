"""`imagenet train --recipe paper|authors`: the recipes as data, their defaults under the flags, the one-line error
without timm, and the recipe in the run's config.json (timm itself: test_imagenet_timm.py)."""
import json
import sys
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import lra_soft.imagenet
from cli import app
from lra_soft.imagenet.recipes import RECIPES, build_train_transform, get_recipe
from lra_soft.imagenet.train import ImageNetConfig
from lra_soft.imagenet.transforms import RandomHorizontalFlip, RandomResizedCrop

runner = CliRunner()


def test_paper_recipe_is_the_default_and_our_transforms():
    paper = get_recipe("paper")
    assert asdict(ImageNetConfig.for_recipe("paper")) == asdict(ImageNetConfig())
    assert paper.defaults("soft_huge") == {} and not paper.uses_timm
    crop, flip = build_train_transform(paper, 32).steps[:2]
    assert isinstance(crop, RandomResizedCrop) and isinstance(flip, RandomHorizontalFlip)
    assert (crop.scale, crop.ratio, flip.p) == (paper.scale, paper.ratio, paper.hflip)
    assert paper.auto_augment is None and paper.re_prob == 0 and paper.color_jitter is None
    with pytest.raises(ValueError, match="recipe 'deit' is unknown; choose from paper, authors"):
        get_recipe("deit")


def test_authors_recipe_values():
    """The authors' main.py and config/SOFT_*.yaml: augmentation strings, floor, clipping, EMA, crop, lr per model."""
    authors = RECIPES["authors"]
    assert (authors.auto_augment, authors.re_prob, authors.re_mode, authors.re_count, authors.color_jitter,
            authors.interpolation) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1, 0.4, "random")
    tiny = ImageNetConfig.for_recipe("authors")
    assert (tiny.recipe, tiny.lr, tiny.min_lr, tiny.clip_grad, tiny.ema_decay, tiny.crop_pct) == \
        ("authors", 1e-3, 5e-5, 1.0, 0.99996, 0.9)
    assert ImageNetConfig.for_recipe("authors", model="soft_huge").lr == 2.7e-4
    assert ImageNetConfig.for_recipe("authors", model="soft_medium", lr=1e-4).lr == 1e-4  # given wins
    assert json.loads(json.dumps(authors.settings()))["config"]["ema_decay"] == 0.99996


def _capture(monkeypatch):
    seen = {}

    def fake_train(cfg, data, out, **kwargs):
        seen["cfg"] = cfg
        return {"step": 0, "top1": 0.0, "top5": 0.0, "images": 0}

    monkeypatch.setattr(lra_soft.imagenet, "train", fake_train)
    return seen


def test_cli_recipe_defaults_yield_to_given_flags(monkeypatch, tmp_path):
    seen = _capture(monkeypatch)
    args = ["imagenet", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--recipe", "authors", "--clip-grad", "0.5", "--model", "soft_large"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.recipe, cfg.clip_grad, cfg.ema_decay, cfg.lr, cfg.min_lr, cfg.crop_pct) == \
        ("authors", 0.5, 0.99996, 3.3e-4, 5e-5, 0.9)
    result = runner.invoke(app, [*args, "--ema-decay", "0.9"])
    assert result.exit_code == 0, result.output
    assert asdict(seen["cfg"]) == asdict(ImageNetConfig(ema_decay=0.9))


def test_authors_recipe_without_timm_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError, as where it is missing
    monkeypatch.setitem(sys.modules, "timm.data", None)
    result = runner.invoke(app, ["imagenet", "train", "--data", str(tmp_path / "nowhere"), "--out",
                                 str(tmp_path / "run"), "--recipe", "authors", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --recipe authors draws the authors' augmentations from timm")
    assert "pip install 'lra-soft[timm]'" in lines[0] and "--recipe paper" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the data (which does not even exist) is read


@pytest.mark.slow  # one training step through the CLI
def test_run_config_holds_the_recipe(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    out = tmp_path / "run"
    result = runner.invoke(app, ["imagenet", "train", "--data", str(tmp_path / "data"), "--out", str(out),
                                 "--img-size", "32", "--global-batch", "4", "--epochs", "1", "--warmup-epochs", "0",
                                 "--max-steps", "1", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == RECIPES["paper"].settings() and config["train"]["recipe"] == "paper"
