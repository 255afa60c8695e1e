"""Training and evaluation of the LRA encoder, following the Nystromformer PyTorch harness that SOFT's Table 6 uses
(paper Section 4.5), with the harness's known pitfalls fixed:

- AdamW (betas 0.9/0.999, eps 1e-6, weight decay 0) and the harness's one-cycle learning rate with linear phases:
  lr/25 -> lr over ``warmup`` steps, then linearly down to lr/25e4 at the last step; with ``beta1_cycle`` Adam's
  beta1 follows the harness's ``OneCycleLR(cycle_momentum=True)``: 0.95 -> 0.85 at the peak -> 0.95.
- Precision on CUDA from ``TrainConfig.precision``: fp16 autocast with a GradScaler (the harness), bf16, or fp32.
- Model selection on the dev split (best dev accuracy; the whole dev split unless ``eval_batches`` is set); that
  checkpoint is then evaluated on the FULL test split (the harness drops the last test batch).
- Runs are trustworthy: ``last.pt`` holds model, optimizer, scheduler, every process's RNG states and the data
  position (the step; the order of batches is a pure function of seed and epoch), so a run killed at any moment and
  resumed ends with the same metrics as an uninterrupted one on CPU. A NaN/inf loss stops the run naming the step.
- Data parallel through torchrun: a DistributedSampler-ordered global batch is split over the processes; gradients
  are averaged by DDP, so N processes with batch B/N each take the same steps as one process with batch B.

The run directory holds config.json, metrics.jsonl, last.pt, best.pt, results.json and learning_curve.png.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from lra_soft import distributed as D
from lra_soft.checkpoint import (CheckpointError, atomic_write_text, capture_rng_state, load_checkpoint,
                                 restore_rng_state, save_checkpoint)
from lra_soft.config import EncoderConfig, TrainConfig
from lra_soft.encoder import build_model
from lra_soft.protocol import PRECISIONS, Protocol
from lra_soft.protocol import apply as apply_protocol

INPUTS = ("input_ids", "mask", "input_ids2", "mask2")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TaskData:
    """What a task gives the training loop: three splits, a collate function and the vocabulary."""
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    collate: Callable[..., dict[str, torch.Tensor]]   # collate(items, pad_to=0) -> {"input_ids", "mask", "label", ...}
    vocab: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # where the data came from (cache path, manifest summary)


# --------------------------------------------------------------------------------------------------- pure helpers

def _one_cycle(step: int, steps: int, warmup: int) -> tuple[bool, float]:
    """(in warmup, fraction of the phase done) at optimizer step ``step`` of OneCycleLR's two linear phases: the
    first ends at step ``warmup - 1`` (pct_start * total_steps - 1), the second at step ``steps - 1``."""
    peak = min(warmup, steps) - 1
    if step <= peak:
        return True, step / max(peak, 1)
    return False, min(step - peak, steps - 1 - peak) / max(steps - 1 - peak, 1)


def lr_factor(step: int, steps: int, warmup: int, div: float = 25.0, final_div: float = 1e4) -> float:
    """The harness's ``OneCycleLR(anneal_strategy="linear")`` as a multiple of the peak lr at optimizer step ``step``:
    lr/25 rising linearly to the peak at step ``warmup - 1``, then falling linearly to lr/25e4 at step ``steps - 1``.

    Written out rather than calling ``OneCycleLR`` so that runs shorter than the task's warmup (``--steps 3``) stay
    well defined: the warmup is then the whole run."""
    start, end = 1.0 / div, 1.0 / (div * final_div)
    warming, pct = _one_cycle(step, steps, warmup)
    return start + (1.0 - start) * pct if warming else 1.0 + (end - 1.0) * pct


def beta1_at(step: int, steps: int, warmup: int, cycle: tuple[float, float]) -> float:
    """OneCycleLR's ``cycle_momentum`` for Adam: beta1 = max at step 0, falling linearly to base at the peak lr
    (step ``warmup - 1``), rising back to max at step ``steps - 1``; ``cycle`` = (max, base), harness (0.95, 0.85)."""
    high, low = cycle
    warming, pct = _one_cycle(step, steps, warmup)
    return high + (low - high) * pct if warming else low + (high - low) * pct


class OneCycle(torch.optim.lr_scheduler.LambdaLR):
    """``lr_factor`` on every group and, with ``beta1_cycle``, Adam's beta1 from ``beta1_at``: the harness's
    ``OneCycleLR(anneal_strategy="linear", cycle_momentum=True)``, defined for runs shorter than the warmup too."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, warmup: int,
                 beta1_cycle: tuple[float, float] | None = None):
        self.steps, self.warmup = steps, warmup
        self.beta1_cycle = tuple(beta1_cycle) if beta1_cycle else None
        super().__init__(optimizer, partial(lr_factor, steps=steps, warmup=warmup))

    def step(self, epoch: int | None = None) -> None:
        super().step()
        if self.beta1_cycle:
            beta1 = beta1_at(self.last_epoch, self.steps, self.warmup, self.beta1_cycle)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, group["betas"][1])


def resolve_configs(model: EncoderConfig, train: TrainConfig, *, protocol: Protocol | None = None,
                    attention: str | None = None, attention_options: dict[str, Any] | None = None,
                    max_len: int | None = None, vocab_size: int | None = None, num_classes: int | None = None,
                    pooling: str | None = None, dropout: float | None = None, **train_overrides: Any
                    ) -> tuple[EncoderConfig, TrainConfig]:
    """Task defaults, then the data's vocabulary/classes, then the protocol, then the user's overrides (None = keep);
    ``attention_options`` are merged over the task's and the protocol's."""
    model = replace(model, **{k: v for k, v in dict(attention=attention, max_len=max_len, vocab_size=vocab_size,
                                                    num_classes=num_classes).items() if v is not None})
    if protocol is not None:
        model, train = apply_protocol(protocol, model, train)
    model = replace(model, attention_options={**model.attention_options, **(attention_options or {})},
                    **{k: v for k, v in dict(pooling=pooling, dropout=dropout).items() if v is not None})
    train = replace(train, **{k: v for k, v in train_overrides.items() if v is not None})
    if train.steps < 1 or train.batch_size < 1 or train.eval_every < 1:
        raise ValueError(f"steps, batch_size and eval_every must be >= 1, got {train.steps}, {train.batch_size}, "
                         f"{train.eval_every}")
    if train.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {train.precision!r}")
    return model, train


def batch_order(num_items: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of one epoch: DistributedSampler's seeded permutation, cut into local batches.

    Global batch k is items ``perm[k*B:(k+1)*B]`` whatever the number of processes (each takes every world-th
    item), so a run on N processes sees the same global batches as a run on one; the last partial batch is dropped.
    """
    sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    local = batch_size // world
    return [indices[i:i + local] for i in range(0, len(indices) - local + 1, local)]


def collate_fn(collate: Callable, pad_to: int, max_len: int) -> Callable:
    """The task's collate, padded to ``pad_to`` (0 = longest in batch) and truncated to the model's ``max_len``."""
    def fn(items):
        batch = collate(items, pad_to=min(pad_to, max_len) if pad_to else 0)
        for ids, mask in (("input_ids", "mask"), ("input_ids2", "mask2")):
            if ids in batch and batch[ids].shape[1] > max_len:
                batch[ids], batch[mask] = batch[ids][:, :max_len], batch[mask][:, :max_len]
        return batch
    return fn


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["mask"].sum()) + (int(batch["mask2"].sum()) if "mask2" in batch else 0)


def versions() -> dict[str, str]:
    from importlib import metadata

    import numpy
    try:
        ours = metadata.version("lra-soft")
    except metadata.PackageNotFoundError:
        ours = "not installed"
    return {"lra_soft": ours, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, collate: Callable, *, batch_size: int,
             device: torch.device, max_batches: int = 0, precision: str = "bf16") -> dict[str, float]:
    """Accuracy and mean loss over ``dataset`` (every item, in order; the first ``max_batches`` batches if set).

    Under torchrun each process takes every world-th item and the counts are summed, so no item is dropped or
    counted twice.
    """
    model.eval()
    n = len(dataset)
    if max_batches:
        n = min(n, max_batches * batch_size)
    mine = list(range(D.rank(), n, D.world_size()))
    local = max(1, batch_size // D.world_size())
    loader = DataLoader(dataset, batch_sampler=[mine[i:i + local] for i in range(0, len(mine), local)],
                        collate_fn=collate, generator=torch.Generator())
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, count, loss * count
    for batch in loader:
        batch = _to(batch, device)
        with D.autocast(device, precision):
            logits = model(**{k: batch[k] for k in INPUTS if k in batch})
        labels = batch["label"]
        sums += torch.stack([(logits.argmax(-1) == labels).sum().double(), torch.tensor(len(labels), device=device,
                             dtype=torch.float64), _loss(logits, labels).double() * len(labels)])
    D.all_reduce_sum(sums)
    correct, count, loss = sums.tolist()
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1), "count": int(count)}


# --------------------------------------------------------------------------------------------------- run files

def _plot_curve(run_dir: Path) -> None:
    """learning_curve.png from metrics.jsonl: train loss and dev accuracy against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax1.set(xlabel="step", ylabel="train loss", title="training loss")
    ax2.plot([r["step"] for r in rows], [100 * r["val_acc"] for r in rows], marker=".", color="C1")
    ax2.set(xlabel="step", ylabel="dev accuracy (%)", title="dev accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_dir / ".learning_curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(run_dir / "learning_curve.png")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step``: a resumed run rewrites what came after its checkpoint, including a
    line cut short by the kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _checkpoint_config(task: str, model_cfg: EncoderConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"task": task, "model": asdict(model_cfg), "train": asdict(train_cfg)}


def model_from_checkpoint(state: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the classifier of a best.pt/last.pt and load its weights; returns (model, stored config)."""
    cfg = state["config"]
    model = build_model(EncoderConfig(**cfg["model"]))
    model.load_state_dict(state["model"])
    return model, cfg


# --------------------------------------------------------------------------------------------------- training

def fit(task: str, model_cfg: EncoderConfig, train_cfg: TrainConfig, data: TaskData, run_dir: str | Path, *,
        device: str = "auto", resume: bool = False, progress: bool = True,
        differences: list[str] | None = None) -> dict[str, Any]:
    """Train, select on dev, test the best checkpoint; returns the results.json dict (on every process).

    ``differences`` from the paper's Table 6 setting (``lra_soft.protocol.differences``; empty = comparable) go into
    results.json; None records the run as not checked, hence not comparable."""
    info = D.init_distributed(device)
    dev, world, rank = info.device, info.world_size, info.rank
    run_dir = Path(run_dir)
    if train_cfg.batch_size % world:
        raise ValueError(f"global batch size {train_cfg.batch_size} is not divisible by {world} processes; "
                         "pass a --batch-size that is")
    last_path, best_path, metrics_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.jsonl"
    if resume and not last_path.exists():
        raise CheckpointError(f"--resume: {last_path} does not exist (nothing to resume in {run_dir}); "
                              "drop --resume to start a new run")
    if not resume and (last_path.exists() or (run_dir / "results.json").exists()):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or another --out")
    config = _checkpoint_config(task, model_cfg, train_cfg)

    # The same initial weights on every process (DDP also broadcasts rank 0's); per-process dropout streams after.
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(dev)
    torch.manual_seed(train_cfg.seed + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.999), eps=train_cfg.adam_eps,
                            weight_decay=train_cfg.weight_decay)
    sched = OneCycle(opt, train_cfg.steps, train_cfg.warmup, train_cfg.beta1_cycle)
    precision = train_cfg.precision if dev.type == "cuda" else "fp32"  # what really runs
    scaler = D.grad_scaler(dev, precision)
    # wall: elapsed seconds of all sessions; train_time/tokens: time inside training steps and real tokens seen
    step, best_acc, best_step, wall, train_time, tokens_seen = 0, -1.0, 0, 0.0, 0.0, 0.0
    if resume:
        state = load_checkpoint(last_path, required=("model", "optimizer", "scheduler", "rng", "step", "config"))
        if state["config"] != config:
            raise CheckpointError(f"{last_path} was written with another configuration than this command's; "
                                  f"resume with the same options (stored: {json.dumps(state['config'])})")
        if state["world_size"] != world:
            raise CheckpointError(f"{last_path} was written by {state['world_size']} processes, this run has {world}; "
                                  "resume with the same number of processes")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][rank])
        step, best_acc, best_step = state["step"], state["best_acc"], state["best_step"]
        wall, train_time, tokens_seen = state["wall"], state["train_time"], state["tokens"]
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(
            {**config, "vocab": data.vocab, "data": data.source, "world_size": world, "device": str(dev),
             "versions": versions()}, indent=1) + "\n")
        if resume:
            _truncate_metrics(metrics_path, step)
            for stale in run_dir.glob(".*.tmp"):  # a write that a kill cut short (never a file we read)
                stale.unlink(missing_ok=True)
        else:
            metrics_path.unlink(missing_ok=True)
    D.barrier()
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 \
        else model

    collate = collate_fn(data.collate, train_cfg.pad_to, model_cfg.max_len)
    per_epoch = math.ceil(len(data.train) / world) // (train_cfg.batch_size // world)  # = len(batch_order(...))
    if per_epoch == 0:
        raise ValueError(f"the train split has {len(data.train)} examples, fewer than one batch of "
                         f"{train_cfg.batch_size}; pass a smaller --batch-size")
    bar = tqdm(total=train_cfg.steps, initial=step, disable=not (progress and info.is_main), dynamic_ncols=True,
               desc=f"{task}/{model_cfg.attention}")
    interval = torch.zeros(4, dtype=torch.float64, device=dev)  # loss * items, correct, items, tokens since last eval
    interval_time, last_good, session_start, wall0 = 0.0, step, time.perf_counter(), wall
    while step < train_cfg.steps:
        epoch, offset = divmod(step, per_epoch)
        batches = batch_order(len(data.train), train_cfg.batch_size, train_cfg.seed, epoch, rank, world)[offset:]
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, and a resumed run,
        # which opens a fresh iterator mid-epoch, would then see other dropout masks than the uninterrupted one.
        for batch in DataLoader(data.train, batch_sampler=batches, collate_fn=collate, generator=torch.Generator()):
            tic = time.perf_counter()
            ddp.train()
            batch = _to(batch, dev)
            with D.autocast(dev, precision):
                logits = ddp(**{k: batch[k] for k in INPUTS if k in batch})
            loss = _loss(logits, batch["label"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            stats = torch.stack([loss.detach().double() * len(logits),
                                 (logits.argmax(-1) == batch["label"]).sum().double(),
                                 torch.tensor(len(logits), dtype=torch.float64, device=dev),
                                 torch.tensor(_tokens(batch), dtype=torch.float64, device=dev)])
            D.all_reduce_sum(stats)
            if not math.isfinite(stats[0].item()):
                bar.close()
                kept = f"the last good checkpoint is {last_path} (step {last_good})" if last_good else \
                    "no checkpoint was written yet"
                raise TrainingDiverged(f"loss is {stats[0].item() / stats[2].item()} at step {step + 1}; the run "
                                       f"stopped and {kept}. Lower --lr or check the data, then --resume or start "
                                       "again")
            if train_cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), train_cfg.grad_clip)
            scaler.step(opt)  # opt.step() unless fp16 gradients overflowed
            scaler.update()
            sched.step()
            step += 1
            interval += stats
            took = time.perf_counter() - tic
            interval_time += took
            train_time += took
            tokens_seen += stats[3].item()
            bar.update(1)
            bar.set_postfix(loss=f"{stats[0].item() / stats[2].item():.4f}", refresh=False,
                            acc=f"{stats[1].item() / stats[2].item():.3f}", tok_s=f"{stats[3].item() / took:,.0f}")

            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                dev_metrics = evaluate(model, data.val, collate, batch_size=train_cfg.batch_size, device=dev,
                                       max_batches=train_cfg.eval_batches, precision=precision)
                loss_sum, correct, items, tokens = interval.tolist()
                row = {"step": step, "loss": loss_sum / items, "acc": correct / items,
                       "lr": sched.get_last_lr()[0], "beta1": opt.param_groups[0]["betas"][0],
                       "tokens_per_s": tokens / interval_time,
                       "val_acc": dev_metrics["acc"], "val_loss": dev_metrics["loss"]}
                interval.zero_()
                interval_time = 0.0
                improved = dev_metrics["acc"] > best_acc
                if improved:
                    best_acc, best_step = dev_metrics["acc"], step
                rngs = D.all_gather_objects(capture_rng_state())
                wall = wall0 + time.perf_counter() - session_start
                if info.is_main:
                    # Order matters for a kill between writes: best.pt, then the metrics line, then last.pt
                    # (a resume from the older last.pt redoes and rewrites all three identically).
                    if improved:
                        save_checkpoint(best_path, {"model": model.state_dict(), "config": config,
                                                    "vocab": data.vocab, "step": step, "val_acc": best_acc})
                    _append_metrics(metrics_path, row)
                    save_checkpoint(last_path, {
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(), "rng": rngs, "step": step, "best_acc": best_acc, "best_step": best_step, "wall": wall,
                        "train_time": train_time, "tokens": tokens_seen,
                        "world_size": world, "config": config, "vocab": data.vocab})
                D.barrier()
                last_good = step
                if info.is_main and progress:
                    bar.write(f"step {step}: loss {row['loss']:.4f}, dev acc {100 * row['val_acc']:.2f}% (best "
                              f"{100 * best_acc:.2f}% at step {best_step}), {row['tokens_per_s']:,.0f} tokens/s")
            if step >= train_cfg.steps:
                break
    bar.close()

    # The best dev checkpoint, on the whole test split.
    best = load_checkpoint(best_path, map_location=dev, required=("model",))
    model.load_state_dict(best["model"])
    test = evaluate(model, data.test, collate, batch_size=train_cfg.batch_size, device=dev, precision=precision)
    wall = wall0 + time.perf_counter() - session_start
    results = {"task": task, "attention": model_cfg.attention, "attention_options": model_cfg.attention_options,
               "test_acc": test["acc"], "test_examples": test["count"], "test_loss": test["loss"],
               "best_val_acc": best_acc, "best_step": best_step, "steps": step, "seed": train_cfg.seed,
               "protocol": train_cfg.protocol, "precision": precision, "comparable": differences == [],
               "differences": ["not checked against the paper's setting"] if differences is None else differences,
               "wall_time_s": wall, "train_time_s": train_time, "tokens_per_s": tokens_seen / max(train_time, 1e-9)}
    if info.is_main:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1) + "\n")
        _plot_curve(run_dir)
    D.barrier()
    return results
