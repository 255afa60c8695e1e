"""Training and evaluation of the LRA encoder, following the Nystromformer PyTorch harness that SOFT's Table 6 uses
(paper Section 4.5), with the harness's known traps fixed (docs/pitfalls.md):

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

This module is the recipe (``LRARecipe``); ``lra_soft.engine`` runs it. The run directory holds config.json,
metrics.jsonl, last.pt, best.pt, results.json and learning_curve.png.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from lra_soft import distributed as D
from lra_soft import engine
from lra_soft.checkpoint import CheckpointError
from lra_soft.config import EncoderConfig, TrainConfig
from lra_soft.curves import plot_learning_curve
from lra_soft.encoder import build_model
from lra_soft.engine import Loop, Recipe, TrainingDiverged

__all__ = ["TaskData", "LRARecipe", "fit", "evaluate", "resolve_configs", "TrainingDiverged", "OneCycle"]
from lra_soft.protocol import PRECISIONS, Protocol
from lra_soft.protocol import apply as apply_protocol

INPUTS = ("input_ids", "mask", "input_ids2", "mask2")


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
    for flag, value in (("--steps", train.steps), ("--batch-size", train.batch_size),
                        ("--eval-every", train.eval_every)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
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


# --------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, collate: Callable, *, batch_size: int,
             device: torch.device, max_batches: int = 0, precision: str = "bf16", progress: str = ""
             ) -> dict[str, float]:
    """Accuracy and mean loss over ``dataset`` (every item, in order; the first ``max_batches`` batches if set).

    Under torchrun each process takes every world-th item and the counts are summed, so no item is dropped or
    counted twice. ``progress``: the label of a progress bar (on the main process; none when empty).
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
    for batch in tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True,
                      disable=None if progress and D.is_main() else True):  # None: on a terminal only
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

def model_from_checkpoint(state: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the classifier of a best.pt/last.pt and load its weights; returns (model, stored config)."""
    cfg = state["config"]
    model = build_model(EncoderConfig(**cfg["model"]))
    model.load_state_dict(state["model"])
    return model, cfg


# --------------------------------------------------------------------------------------------------- the recipe

class LRARecipe(Recipe):
    """The LRA encoder on one task: AdamW + the harness's one-cycle schedule, cross-entropy, dev accuracy selects,
    the best checkpoint is tested on the whole test split."""

    def __init__(self, task: str, model_cfg: EncoderConfig, train_cfg: TrainConfig, data: TaskData,
                 differences: list[str] | None = None):
        self.task, self.model_cfg, self.train_cfg, self.data = task, model_cfg, train_cfg, data
        self.differences = differences
        self.collate = collate_fn(data.collate, train_cfg.pad_to, model_cfg.max_len)
        self.tokens = 0.0  # real tokens trained on, over all sessions

    def setup(self, info: D.DistInfo) -> None:
        cfg, world = self.train_cfg, info.world_size
        if cfg.batch_size % world:
            raise ValueError(f"global batch size {cfg.batch_size} is not divisible by {world} processes; "
                             "pass a --batch-size that is")
        per_epoch = math.ceil(len(self.data.train) / world) // (cfg.batch_size // world)  # = len(batch_order(..))
        if per_epoch == 0:
            raise ValueError(f"the train split has {len(self.data.train)} examples, fewer than one batch of "
                             f"{cfg.batch_size}; pass a smaller --batch-size")
        self.info = info
        self.loop = Loop(steps=cfg.steps, steps_per_epoch=per_epoch, eval_every=cfg.eval_every, seed=cfg.seed,
                         precision=cfg.precision, grad_clip=cfg.grad_clip,
                         desc=f"{self.task}/{self.model_cfg.attention}")

    def build_model(self) -> torch.nn.Module:
        return build_model(self.model_cfg)

    def optimizer(self, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, OneCycle]:
        cfg = self.train_cfg
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        return opt, OneCycle(opt, cfg.steps, cfg.warmup, cfg.beta1_cycle)

    def micro_batches(self, epoch: int, start: int) -> Iterable[dict[str, torch.Tensor]]:
        cfg, info = self.train_cfg, self.info
        batches = batch_order(len(self.data.train), cfg.batch_size, cfg.seed, epoch, info.rank,
                              info.world_size)[start:]
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, and a resumed run,
        # which opens a fresh iterator mid-epoch, would then see other dropout masks than the uninterrupted one.
        loader = DataLoader(self.data.train, batch_sampler=batches, collate_fn=self.collate,
                            generator=torch.Generator())
        return (_to(batch, info.device) for batch in loader)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**{k: batch[k] for k in INPUTS if k in batch})
        loss = _loss(logits, batch["label"])
        dev = logits.device
        stats = torch.stack([loss.detach().double() * len(logits),  # loss * items, items, correct, tokens
                             torch.tensor(len(logits), dtype=torch.float64, device=dev),
                             (logits.argmax(-1) == batch["label"]).sum().double(),
                             torch.tensor(_tokens(batch), dtype=torch.float64, device=dev)])
        return loss, stats

    def after_step(self, stats: torch.Tensor) -> None:
        self.tokens += stats[3].item()

    def postfix(self, stats: torch.Tensor, seconds: float) -> dict[str, str]:
        return {"loss": f"{stats[0].item() / stats[1].item():.4f}", "acc": f"{stats[2].item() / stats[1].item():.3f}",
                "tok_s": f"{stats[3].item() / seconds:,.0f}"}

    def record(self, step, stats, seconds, model, ema, optimizer, scheduler):
        cfg = self.train_cfg
        dev = evaluate(model, self.data.val, self.collate, batch_size=cfg.batch_size, device=self.info.device,
                       max_batches=cfg.eval_batches, precision=self.loop.precision_on(self.info.device),
                       progress=f"dev evaluation at step {step}" if self.progress else "")
        loss_sum, items, correct, tokens = stats.tolist()
        row = {"step": step, "loss": loss_sum / items, "acc": correct / items, "lr": scheduler.get_last_lr()[0],
               "beta1": optimizer.param_groups[0]["betas"][0], "tokens_per_s": tokens / seconds,
               "val_acc": dev["acc"], "val_loss": dev["loss"]}
        return row, dev["acc"]

    def report(self, row, best, best_step) -> str:
        return (f"step {row['step']}: loss {row['loss']:.4f}, dev acc {100 * row['val_acc']:.2f}% (best "
                f"{100 * best:.2f}% at step {best_step}), {row['tokens_per_s']:,.0f} tokens/s")

    def config(self) -> dict[str, Any]:
        return {"task": self.task, "model": asdict(self.model_cfg), "train": asdict(self.train_cfg)}

    def config_file(self) -> dict[str, Any]:
        return {**self.config(), "vocab": self.data.vocab, "data": self.data.source}

    def state(self) -> dict[str, Any]:
        return {"vocab": self.data.vocab, "tokens": self.tokens, "data_sha256": self.data.source.get("arrays_sha256")}

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Also refuse to continue on other data: a cache rebuilt since the run began (other options or sources, or
        after damage) has other arrays. Checkpoints written before the fingerprint was recorded are not checked."""
        super().check_resume(state, path)
        then, now = state.get("data_sha256"), self.data.source.get("arrays_sha256")
        if then is not None and now is not None and then != now:
            cache = self.data.source.get("cache")
            raise CheckpointError(f"{path} was trained on another build of the data than {cache} holds now"
                                  " (its arrays differ: the cache was rebuilt since the run began); resume "
                                  "with the --data-dir and --data-option values of the run's config.json, or start "
                                  "a new run")

    def load_state(self, state: dict[str, Any]) -> None:
        self.tokens = state["tokens"]

    def finish(self, model, ema, best, run):
        model.load_state_dict(best["model"])
        test = evaluate(model, self.data.test, self.collate, batch_size=self.train_cfg.batch_size,
                        device=self.info.device, precision=run["precision"],
                        progress="test evaluation of best.pt" if self.progress else "")
        diffs = self.differences
        return {"task": self.task, "attention": self.model_cfg.attention,
                "attention_options": self.model_cfg.attention_options,
                "test_acc": test["acc"], "test_examples": test["count"], "test_loss": test["loss"],
                "best_val_acc": run["best_acc"], "best_step": run["best_step"], "steps": run["step"],
                "seed": self.train_cfg.seed, "protocol": self.train_cfg.protocol, "precision": run["precision"],
                "comparable": diffs == [],
                "differences": ["not checked against the paper's setting"] if diffs is None else diffs,
                "wall_time_s": run["wall_time_s"], "train_time_s": run["train_time_s"],
                "tokens_per_s": self.tokens / max(run["train_time_s"], 1e-9)}

    def artifacts(self, run_dir: Path) -> None:
        plot_learning_curve(run_dir)

    def cheaper(self) -> str:
        model, hints = self.model_cfg, []
        if model.attention == "soft" and "num_landmarks" not in model.attention_options:
            hints.append("SOFT with a fixed bottleneck (-o num_landmarks=64) is several times faster")
        if self.train_cfg.pad_to:
            hints.append("--protocol clean pads each batch to its longest sequence only")
        if self.train_cfg.steps > 1000:
            hints.append(f"--steps {self.train_cfg.steps // 10} for a first look")
        return "cheaper: " + "; ".join(hints) + " (each makes the run not comparable with Table 6)" if hints else ""


def fit(task: str, model_cfg: EncoderConfig, train_cfg: TrainConfig, data: TaskData, run_dir: str | Path, *,
        device: str = "auto", resume: bool = False, progress: bool = True,
        differences: list[str] | None = None) -> dict[str, Any]:
    """Train, select on dev, test the best checkpoint; returns the results.json dict (on every process).

    ``differences`` from the paper's Table 6 setting (``lra_soft.protocol.differences``; empty = comparable) go into
    results.json; None records the run as not checked, hence not comparable."""
    return engine.fit(LRARecipe(task, model_cfg, train_cfg, data, differences), run_dir, device=device,
                      resume=resume, progress=progress)
