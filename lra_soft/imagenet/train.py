"""ImageNet training and evaluation of the SOFT backbones: the paper's recipe (Section 4.1) on torch alone, or the
authors' (their augmentations through timm; ``lra_soft.imagenet.recipes``).

AdamW, weight decay 0.05, 10 epochs of linear warm-up then cosine annealing, 300 epochs, global batch 1024 split
over the DDP processes (``torchrun``; per-process batch = global / world, with gradient accumulation when
``micro_batch`` is smaller), label smoothing 0.1, random resized crop + flip, mixup + CutMix. Where the paper is
silent the authors' DeiT-style configs fill in: peak lr 1e-3 at batch 1024 scaled linearly with the global batch,
warm-up from 1e-6, floor 1e-5, AdamW eps 1e-8, no decay on biases, norms, positions and the class token. EMA of the
weights (``torch.optim.swa_utils.AveragedModel``) is optional; the authors report EMA weights (decay 0.99996).
This module is the recipe (``ImageNetRecipe``); ``lra_soft.engine`` runs it, evaluating and writing ``last.pt`` at
every epoch's end (``best.pt`` by top-1, of the EMA when there is one); ``resume`` continues exactly where a run
stopped, as for the LRA tasks.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import numpy as np
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lra_soft import distributed as dist
from lra_soft import engine
from lra_soft.checkpoint import CheckpointError, load_checkpoint
from lra_soft.curves import plot_learning_curve
from lra_soft.engine import Loop, Recipe
from lra_soft.imagenet.augment import MixupCutmix, soft_target_cross_entropy
from lra_soft.imagenet.data import ImageFolder
from lra_soft.imagenet.recipes import build_train_transform, check_available, get_recipe
from lra_soft.imagenet.transforms import eval_transform, eval_resize
from lra_soft.vision import SoftVisionTransformer, VisionConfig, build_model
from lra_soft.vision.model import config_dict


@dataclass(frozen=True)
class ImageNetConfig:
    recipe: str = "paper"           # a key of lra_soft.imagenet.recipes.RECIPES: "paper" or "authors" (needs timm)
    model: str = "soft_tiny"        # a key of lra_soft.vision.PRESETS
    img_size: int = 224             # training crop; evaluation resizes to img_size / crop_pct first
    crop_pct: float = 0.875         # 224 / 256 (Table 3)
    epochs: int = 300
    warmup_epochs: int = 10         # linear warm-up from warmup_lr (Section 4.1)
    global_batch: int = 1024        # across all processes (Section 4.1)
    micro_batch: int = 0            # per-process forward batch; 0 = global_batch / world (no accumulation)
    lr: float = 1e-3                # peak lr at global batch 1024, scaled by global_batch / 1024 (authors' T/S)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5            # cosine floor (DeiT)
    weight_decay: float = 0.05      # Section 4.1
    adam_eps: float = 1e-8
    label_smoothing: float = 0.1
    mixup: float = 0.8              # Beta(alpha, alpha) of mixup; 0 disables
    cutmix: float = 1.0             # Beta(alpha, alpha) of CutMix; 0 disables
    mix_prob: float = 1.0           # chance that a batch is mixed at all
    switch_prob: float = 0.5        # chance of CutMix rather than mixup
    drop_path: float = 0.1          # stochastic depth of the backbone
    clip_grad: float = 0.0          # max grad norm; 0 = none (the paper names none, the authors' configs use 1.0)
    ema_decay: float = 0.0          # 0 = no EMA; the authors evaluate an EMA with 0.99996
    amp: bool = True                # bf16 autocast on CUDA (float32 on CPU)
    workers: int = 8                # DataLoader processes per training process
    seed: int = 0
    max_steps: int = 0              # stop after this many optimizer steps (smoke runs); 0 = the full schedule

    @classmethod
    def for_recipe(cls, recipe: str = "paper", **given) -> ImageNetConfig:
        """The recipe's values (for ``given["model"]``), then ``given`` (e.g. the flags set on the command line)."""
        model = given.get("model", cls.model)
        return cls(**{**get_recipe(recipe).defaults(model), **given, "recipe": recipe})


# --- optimisation -----------------------------------------------------------------------------------------------------

def param_groups(model: SoftVisionTransformer, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on biases, norms, position embeddings, class token."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` relative to ``lr``: linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


# --- evaluation -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True) -> dict[str, float]:
    """Top-1, top-5 (%) and cross-entropy over the loader, summed over every process."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with dist.autocast(device, amp):
            logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (b, 5)
        hits = top5 == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hits[:, 0].sum(), hits.any(-1).sum(),
                             torch.tensor(y.shape[0], device=device)]).double()
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()
    if n == 0:
        raise ValueError("the evaluation split is empty")
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


def eval_loader(root: Path, classes: list[str], cfg: ImageNetConfig, batch_size: int, world: int, rank: int,
                pin: bool) -> DataLoader:
    data = ImageFolder(root, eval_transform(cfg.img_size, cfg.crop_pct), classes=classes)
    shard = list(range(rank, len(data), world))  # every image exactly once over the processes
    # its own generator: evaluating must not advance the training RNG (exact resume)
    return DataLoader(data, batch_size=batch_size, sampler=shard, num_workers=cfg.workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(0))


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, *, split: str = "val", batch_size: int = 64,
                        use_ema: bool = True, device: str = "auto", workers: int = 4) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint written by :func:`train` on ``data_dir/split`` (EMA weights when it has them)."""
    info = dist.init_distributed(device)
    state = load_checkpoint(checkpoint, map_location="cpu", required=("model", "model_config", "config", "classes"))
    cfg = replace(ImageNetConfig(**state["config"]), workers=workers)
    model = SoftVisionTransformer(VisionConfig.from_dict(state["model_config"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    loader = eval_loader(Path(data_dir) / split, state["classes"], cfg, batch_size, info.world_size, info.rank,
                         info.device.type == "cuda")
    metrics = evaluate(model.to(info.device), loader, info.device, cfg.amp)
    return {**metrics, "weights": "ema" if weights is state.get("ema") else "model"}


# --- training ---------------------------------------------------------------------------------------------------------

class ImageNetRecipe(Recipe):
    """A SOFT backbone on an ImageFolder: the paper's recipe, evaluated (and checkpointed) at every epoch's end."""

    def __init__(self, cfg: ImageNetConfig, data_dir: str | Path, **model_overrides):
        self.cfg, self.data_dir, self.model_overrides = cfg, Path(data_dir), model_overrides
        self.recipe = get_recipe(cfg.recipe)
        check_available(self.recipe)  # before any data: a missing library is named in one line
        eval_resize(cfg.img_size, cfg.crop_pct)

    def setup(self, info: dist.DistInfo) -> None:
        cfg = self.cfg
        self.info, self.pin = info, info.device.type == "cuda"
        self.per_process, self.micro, accum = _batch_split(cfg.global_batch, cfg.micro_batch, info.world_size)
        self.train_set = ImageFolder(self.data_dir / "train", build_train_transform(self.recipe, cfg.img_size))
        if self.recipe.uses_timm:  # timm's augmentations draw from Python's and NumPy's generators (per worker:
            random.seed(cfg.seed + info.rank)  # seeded by DataLoader; here for --workers 0)
            np.random.seed(cfg.seed + info.rank)
        self.classes = self.train_set.classes
        self.val = eval_loader(self.data_dir / "val", self.classes, cfg, self.micro, info.world_size, info.rank,
                               self.pin)
        self.sampler = DistributedSampler(self.train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
        per_epoch = len(self.sampler) // self.per_process
        if per_epoch == 0:
            raise ValueError(f"{self.data_dir / 'train'} has {len(self.train_set)} images, fewer than one global "
                             f"batch of {cfg.global_batch}; lower --global-batch")
        self.mix = MixupCutmix(len(self.classes), cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.switch_prob,
                               cfg.label_smoothing)
        self.peak_lr = cfg.lr * cfg.global_batch / 1024
        self.loop = Loop(steps=per_epoch * cfg.epochs, steps_per_epoch=per_epoch, eval_every=per_epoch,
                         seed=cfg.seed, stop_at=cfg.max_steps, accumulation=accum,
                         precision="bf16" if cfg.amp else "fp32", grad_clip=cfg.clip_grad, ema_decay=cfg.ema_decay,
                         desc=cfg.model)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg.model, num_classes=len(self.classes), img_size=cfg.img_size,
                            drop_path=cfg.drop_path, **self.model_overrides)
        self.model_config = config_dict(model.cfg)
        return model

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        cfg, loop = self.cfg, self.loop
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=self.peak_lr, eps=cfg.adam_eps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(
            lr_factor, warmup_steps=loop.steps_per_epoch * cfg.warmup_epochs, total_steps=loop.steps,
            lr=self.peak_lr, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr))
        return opt, self.schedule

    def micro_batches(self, epoch: int, start: int):
        cfg, info, per = self.cfg, self.info, self.per_process
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[start * per: self.loop.steps_per_epoch * per]  # skip what a resume did
        # worker seeds from (seed, epoch, rank), not from the global RNG, so that a resumed epoch matches
        loader = DataLoader(self.train_set, batch_size=self.micro, sampler=order, num_workers=cfg.workers,
                            pin_memory=self.pin, drop_last=True, generator=torch.Generator().manual_seed(
                                (cfg.seed * 1_000_003 + epoch) * 1009 + info.rank))
        for x, y in loader:
            yield x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = self.mix(*batch)
        loss = soft_target_cross_entropy(model(x), targets)
        return loss, torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=loss.device)])

    def postfix(self, stats: torch.Tensor, seconds: float) -> dict[str, str]:
        return {"loss": f"{stats[0].item() / stats[1].item():.3f}", "lr": f"{self.schedule.get_last_lr()[0]:.2e}"}

    def record(self, step, stats, seconds, model, ema, optimizer, scheduler):
        cfg, dev = self.cfg, self.info.device
        row = {"epoch": step // self.loop.steps_per_epoch, "step": step, "lr": scheduler.get_last_lr()[0],
               "train_loss": (stats[0] / stats[1].clamp_min(1)).item(), **evaluate(model, self.val, dev, cfg.amp)}
        if ema is not None:
            row.update({f"ema_{k}": v for k, v in evaluate(ema, self.val, dev, cfg.amp).items()})
        self.last_row = row
        return row, row["ema_top1"] if ema is not None else row["top1"]

    def report(self, row, best, best_step) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

    def config(self) -> dict:
        return asdict(self.cfg)

    def config_file(self) -> dict:
        return {"train": asdict(self.cfg), "recipe": self.recipe.settings(), "model": self.model_config,
                "classes": len(self.classes), "micro_batch": self.micro, "accumulation": self.loop.accumulation,
                "peak_lr": self.peak_lr}

    def check_resume(self, state: dict, path: Path) -> None:
        # the schedule's length may grow (--max-steps), the data and the model may not
        if state["classes"] != self.classes or state["model_config"] != self.model_config:
            raise CheckpointError(f"checkpoint {path} was trained on other classes or another model "
                                  "configuration; resume with the data and --model of that run")
        trained = state.get("config", {}).get("recipe", "paper")
        if trained != self.cfg.recipe:
            raise CheckpointError(f"checkpoint {path} was trained with --recipe {trained}; resume with that recipe")

    def state(self) -> dict:
        return {"classes": self.classes, "model_config": self.model_config}

    def artifacts(self, run_dir: Path) -> None:
        top1 = "ema_top1" if self.loop.ema_decay > 0 else "top1"
        plot_learning_curve(run_dir, loss_key="train_loss", acc_key=top1, acc_scale=1.0,
                            acc_label=f"val top-1 (%){' of the EMA' if top1 == 'ema_top1' else ''}")

    def finish(self, model, ema, best, run) -> dict:
        return {"model": self.cfg.model, **self.last_row, "best_top1": run["best_acc"],
                "best_step": run["best_step"], "precision": run["precision"], "wall_time_s": run["wall_time_s"],
                "train_time_s": run["train_time_s"]}


def train(cfg: ImageNetConfig, data_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
          resume: bool = False, progress: bool = True, **model_overrides) -> dict[str, float]:
    """Train ``cfg.model`` on ``data_dir/{train,val}`` into the run directory ``out_dir`` (config.json,
    metrics.jsonl, last.pt, best.pt, results.json); ``resume`` continues the run there.

    Launch with ``torchrun --nproc_per_node N`` for DDP; returns results.json (the last evaluation's metrics, the
    best top-1 and the timings)."""
    return engine.fit(ImageNetRecipe(cfg, data_dir, **model_overrides), out_dir, device=device, resume=resume,
                      progress=progress)


def _batch_split(global_batch: int, micro_batch: int, world: int) -> tuple[int, int, int]:
    """(per-process batch, micro-batch, accumulation steps) for a global batch over ``world`` processes."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
    per_process = global_batch // world
    micro = micro_batch or per_process
    if per_process % micro:
        raise ValueError(f"per-process batch {per_process} (= {global_batch} / {world}) is not a multiple of "
                         f"--micro-batch {micro}")
    return per_process, micro, per_process // micro
