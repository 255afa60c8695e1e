"""ImageNet training and evaluation of the SOFT backbones: the paper's recipe (Section 4.1) on torch alone.

AdamW, weight decay 0.05, 10 epochs of linear warm-up then cosine annealing, 300 epochs, global batch 1024 split
over the DDP processes (``torchrun``; per-process batch = global / world, with gradient accumulation when
``micro_batch`` is smaller), label smoothing 0.1, random resized crop + flip, mixup + CutMix. Where the paper is
silent the authors' DeiT-style configs fill in: peak lr 1e-3 at batch 1024 scaled linearly with the global batch,
warm-up from 1e-6, floor 1e-5, AdamW eps 1e-8, no decay on biases, norms, positions and the class token. EMA of the
weights (``torch.optim.swa_utils.AveragedModel``) is optional; the authors report EMA weights (decay 0.99996).
Checkpoints (``last.pt`` every epoch, ``best.pt`` by top-1) hold model, EMA, optimizer, schedule, position in the
epoch and every process's RNG state, written atomically and read with ``weights_only=True``; ``resume`` continues
exactly where a run stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from lra_soft import distributed as dist
from lra_soft.checkpoint import (atomic_write_text, capture_rng_state, load_checkpoint, restore_rng_state,
                                 save_checkpoint)
from lra_soft.imagenet.augment import MixupCutmix, soft_target_cross_entropy
from lra_soft.imagenet.data import ImageFolder, eval_transform, train_transform
from lra_soft.vision import SoftVisionTransformer, VisionConfig, build_model
from lra_soft.vision.model import config_dict


@dataclass(frozen=True)
class ImageNetConfig:
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

def train(cfg: ImageNetConfig, data_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
          resume: str | Path | None = None, **model_overrides) -> dict[str, float]:
    """Train ``cfg.model`` on ``data_dir/{train,val}``; writes config.json, log.jsonl, last.pt, best.pt in out_dir.

    Launch with ``torchrun --nproc_per_node N`` for DDP; returns the last evaluation's metrics."""
    info = dist.init_distributed(device)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    per_process, micro, accum = _batch_split(cfg.global_batch, cfg.micro_batch, info.world_size)
    torch.manual_seed(cfg.seed + info.rank)

    train_set = ImageFolder(data_dir / "train", train_transform(cfg.img_size))
    classes = train_set.classes
    pin = info.device.type == "cuda"
    val = eval_loader(data_dir / "val", classes, cfg, micro, info.world_size, info.rank, pin)
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_process
    if steps_per_epoch == 0:
        raise ValueError(f"{data_dir / 'train'} has {len(train_set)} images, fewer than one global batch of "
                         f"{cfg.global_batch}; lower --global-batch")
    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(cfg.model, num_classes=len(classes), img_size=cfg.img_size, drop_path=cfg.drop_path,
                        **model_overrides).to(info.device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay > 0 else None
    peak_lr = cfg.lr * cfg.global_batch / 1024
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, eps=cfg.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=steps_per_epoch * cfg.warmup_epochs, total_steps=total_steps, lr=peak_lr,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr))
    mix = MixupCutmix(len(classes), cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.switch_prob, cfg.label_smoothing)

    step, epoch, batch_in_epoch, best = 0, 0, 0, -1.0
    if resume is not None:
        state = load_checkpoint(resume, map_location="cpu", required=("model", "optimizer", "step", "rng"))
        if state["classes"] != classes or state["model_config"] != config_dict(model.cfg):
            raise ValueError(f"checkpoint {resume} was trained on other classes or another model configuration; "
                             "resume with the data and --model of that run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
            ema.n_averaged.fill_(state["ema_updates"])
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best_top1"]
        rng = state["rng"]
        restore_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(
            {"train": asdict(cfg), "model": config_dict(model.cfg), "classes": len(classes),
             "world_size": info.world_size, "micro_batch": micro, "accumulation": accum, "peak_lr": peak_lr}, indent=2))
    ddp = DistributedDataParallel(model, device_ids=[info.device.index] if pin else None) \
        if info.world_size > 1 else model

    def checkpoint(name: str, metrics: dict) -> None:
        rng = dist.all_gather_objects(capture_rng_state())
        if info.is_main:
            save_checkpoint(out_dir / name, {
                "model": model.state_dict(), "ema": None if ema is None else ema.module.state_dict(),
                "ema_updates": 0 if ema is None else int(ema.n_averaged), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best_top1": best, "metrics": metrics, "config": asdict(cfg), "model_config": config_dict(model.cfg),
                "classes": classes, "rng": rng})

    metrics: dict[str, float] = {}
    limit = cfg.max_steps or total_steps
    while epoch < cfg.epochs and step < limit:
        sampler.set_epoch(epoch)
        order = list(sampler)[batch_in_epoch * per_process: steps_per_epoch * per_process]  # skip what a resume did
        # worker seeds from (seed, epoch, rank), not from the global RNG, so that a resumed epoch matches
        loader = DataLoader(train_set, batch_size=micro, sampler=order, num_workers=cfg.workers, pin_memory=pin,
                            drop_last=True, generator=torch.Generator().manual_seed(
                                (cfg.seed * 1_000_003 + epoch) * 1009 + info.rank))
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}", disable=not info.is_main,
                   leave=False)
        running = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, micro-batches
        for i, (x, y) in enumerate(loader):
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            x, targets = mix(x, y)
            last_micro = (i + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or ddp is model else ddp.no_sync()
            with sync:
                with dist.autocast(info.device, cfg.amp):
                    loss = soft_target_cross_entropy(ddp(x), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step} (epoch {epoch}); lower --lr or "
                                             "enable --clip-grad, and resume from the last checkpoint")
                (loss / accum).backward()
            running += torch.stack([loss.detach().double(), torch.ones((), device=info.device).double()])
            if not last_micro:
                continue
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            if step >= limit:
                break
        bar.close()
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        train_loss = (dist.all_reduce_sum(running)[0] / running[1].clamp_min(1)).item()
        metrics = {"epoch": epoch, "step": step, "lr": schedule.get_last_lr()[0], "train_loss": train_loss,
                   **evaluate(model, val, info.device, cfg.amp)}
        if ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, info.device, cfg.amp).items()})
        top1 = metrics["ema_top1"] if ema is not None else metrics["top1"]
        improved = top1 > best
        best = max(best, top1)
        checkpoint("last.pt", metrics)
        if improved and info.is_main:
            _link_or_copy(out_dir / "last.pt", out_dir / "best.pt")
        if info.is_main:
            with open(out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    dist.barrier()
    return metrics


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


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the file ``src`` is now (a hard link where the file system has them), replaced atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)

