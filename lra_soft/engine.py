"""The one training engine of the toolkit: every loop (LRA encoder, ImageNet backbones) is a recipe run by ``fit``.

A recipe says *what* is trained: the model, its optimizer and schedule, the batches of an epoch, the loss, the
evaluation and the files a run leaves behind. The engine owns *how*, identically for every recipe:

- the run directory: ``config.json``, ``metrics.jsonl`` (one row per evaluation), ``steps.jsonl`` (the training
  loss of every step, for the learning curve), ``last.pt``, ``best.pt`` and ``results.json``; a directory that holds
  a run is refused unless ``resume=True``, which continues it, and one that another process trains into is refused
  (a lock, ``lra_soft.locks``, that dies with its process);
- distributed set-up (``torchrun``: one process per device, DDP averages the gradients), seeding (the same initial
  weights on every process, then a stream per process), gradient accumulation (``no_sync`` on all micro-batches but
  the last), precision (autocast on CUDA, a GradScaler for fp16), gradient clipping, an optional EMA of the weights;
- the divergence check: the step's statistics are summed over all processes before anything else, so a NaN/inf
  loss on one rank stops every rank, at the same step, with the same message and the last good checkpoint; any
  other error of one process (data, a step, a write) reaches all of them the same way (``distributed.agree``);
- SIGINT/SIGTERM (``lra_soft.interrupt``): the step under way finishes, last.pt is written, and ``Interrupted``
  (exit code 130/143 on the command line) says so; a full disk keeps the previous checkpoint (``atomic.DiskFull``);
- evaluation every ``eval_every`` steps and at the end, best-so-far selection, and RNG-exact checkpoints: ``last.pt``
  holds model, optimizer, scheduler, scaler, EMA, every process's RNG states and the step (a recipe's batches are a
  pure function of seed, epoch and step), so a run killed at any moment and resumed ends with the same metrics.

    result = fit(recipe, "runs/x", device="auto", resume=False)

The benchmark's model mode times ``train_step``, the engine's own optimizer step.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lra_soft import distributed as D
from lra_soft.atomic import DiskFull, atomic_write_text, no_space
from lra_soft.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                                 save_checkpoint)
from lra_soft.interrupt import Interrupted, StopRequest
from lra_soft.locks import LOCK, hold

LAST, BEST, CONFIG, RESULTS = "last.pt", "best.pt", "config.json", "results.json"
METRICS, STEPS = "metrics.jsonl", "steps.jsonl"  # one row per evaluation; one row per optimizer step (train loss)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


COLLECTIVE = (TrainingDiverged, D.ProcessFailed)  # raised by every process at once: nothing to tell the others


@dataclass(frozen=True)
class Loop:
    """How long and how a recipe's training runs (the engine's share of its configuration)."""
    steps: int                    # optimizer steps of the whole schedule
    steps_per_epoch: int          # optimizer steps of one pass over the train split
    eval_every: int               # steps between evaluations (always one at the last step)
    seed: int = 0
    stop_at: int = 0              # stop after this many steps (smoke runs); 0 = the whole schedule
    accumulation: int = 1         # micro-batches per optimizer step on each process
    precision: str = "fp32"       # autocast on CUDA: bf16 | fp16 (with a GradScaler) | fp32; CPU runs fp32
    grad_clip: float = 0.0        # max gradient norm; 0 = none
    ema_decay: float = 0.0        # EMA of the weights (torch's AveragedModel); 0 = none
    desc: str = "train"           # progress bar label

    def precision_on(self, device: torch.device) -> str:
        """The precision that really runs: autocast is CUDA's only; CPU runs fp32 whatever is asked."""
        return self.precision if device.type == "cuda" else "fp32"

    @property
    def last_step(self) -> int:
        return min(self.stop_at, self.steps) if self.stop_at else self.steps


class Recipe:
    """What ``fit`` trains. Subclasses fill in every method; the engine calls them in this order:

    ``setup(info)`` once (data, checks against the world size), ``loop``, ``build_model()`` under the shared seed,
    ``optimizer(model)``, then per step ``micro_batches`` / ``loss``, at every evaluation ``record``, at the end
    ``finish``. ``stats`` returned by ``loss`` is a float64 vector summed over micro-batches and processes whose
    first two entries are (sum of losses, their count): the divergence check and the progress bar read those.
    """
    loop: Loop
    progress: bool = False  # set by ``fit``: progress bars wanted (and this is the main process)

    def setup(self, info: D.DistInfo) -> None: ...
    def build_model(self) -> nn.Module: raise NotImplementedError
    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]: raise NotImplementedError
    def micro_batches(self, epoch: int, start: int) -> Iterable[Any]: raise NotImplementedError
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: raise NotImplementedError

    def record(self, step: int, stats: torch.Tensor, seconds: float, model: nn.Module, ema: nn.Module | None,
               optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[dict[str, Any], float]:
        """Evaluate; the metrics row (training ``stats`` since the last evaluation over ``seconds``) and the score
        that selects best.pt (higher is better)."""
        raise NotImplementedError

    def finish(self, model: nn.Module, ema: nn.Module | None, best: dict[str, Any], run: dict[str, Any]
               ) -> dict[str, Any]:
        """results.json from the best checkpoint's state and the run's totals (``run``: step, best_acc, ...)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Stored in every checkpoint as ``config``."""
        raise NotImplementedError

    def config_file(self) -> dict[str, Any]:
        """config.json (the resolved configuration and provenance)."""
        return self.config()

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a last.pt of another run (CheckpointError saying what differs)."""
        if state["config"] != self.config():
            raise CheckpointError(f"{path} was written with another configuration than this command's; resume "
                                  f"with the same options (stored: {json.dumps(state['config'])})")

    def state(self) -> dict[str, Any]:
        """Extra plain values saved in last.pt and best.pt (vocabulary, classes, counters)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None: ...
    def after_step(self, stats: torch.Tensor) -> None: ...
    def postfix(self, stats: torch.Tensor, seconds: float) -> dict[str, str]:
        return {"loss": f"{stats[0].item() / stats[1].item():.4f}"}

    def report(self, row: dict[str, Any], best: float, best_step: int) -> str:
        return json.dumps(row)

    def artifacts(self, run_dir: Path) -> None:
        """Files made from the run's records at the end (plots)."""

    def cheaper(self) -> str:
        """A cheaper setting to suggest when a CPU run would take hours ('' = none)."""
        return ""


# --------------------------------------------------------------------------------------------------- one step

def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any],
               loss: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]], *,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0, accumulation: int = 1,
               ddp: nn.Module | None = None, on_stats: Callable[[torch.Tensor], None] | None = None
               ) -> torch.Tensor:
    """One optimizer step over ``accumulation`` micro-batches; returns the summed ``stats`` of ``loss``.

    ``model`` is what runs forward (a DDP wrapper when distributed; ``ddp`` then names it so that every
    micro-batch but the last skips the gradient all-reduce). ``stats`` are summed over all processes *before* the
    update, and ``on_stats`` sees them there: raising in it (the divergence check) leaves the weights untouched.
    The processes agree (``distributed.agree``) before every DDP collective, so an error of one reaches all.
    """
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, count = None, 0
    for i, batch in enumerate(micro_batches):
        D.agree()  # all fetched their micro-batch: before the forward, where DDP may broadcast buffers
        count += 1
        sync = ddp is None or i == accumulation - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with autocast():
                value, stats = loss(model, batch)
            if sync:
                D.agree()  # all ran their forward: before the backward that all-reduces the gradients
            scaler.scale(value / accumulation if accumulation > 1 else value).backward()
        total = stats if total is None else total + stats
    if count != accumulation:
        raise ValueError(f"an optimizer step needs {accumulation} micro-batches, the data gave {count}")
    D.all_reduce_sum(total)
    if on_stats is not None:
        on_stats(total)
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # optimizer.step() unless fp16 gradients overflowed
    scaler.update()
    return total


def _steps(batches: Iterable[Any], accumulation: int) -> Iterator[Iterator[Any]]:
    """Groups of ``accumulation`` micro-batches, each drawn only when the step reaches it: fetching (and the
    random augmentation it runs) stays in step with the training, and one micro-batch at a time is on the device."""
    it = iter(batches)
    while (first := next(it, _END)) is not _END:
        yield itertools.chain([first], itertools.islice(it, accumulation - 1))


_END = object()


# --------------------------------------------------------------------------------------------------- run directory

class RunDir:
    """A run's files. A new run refuses a directory that already holds one; a resumed run needs its last.pt; while
    a process trains into it (``lock``), any other is refused."""

    def __init__(self, path: str | Path, resume: bool):
        self.path = Path(path)
        self.last, self.best = self.path / LAST, self.path / BEST
        self.metrics, self.steps, self.results = self.path / METRICS, self.path / STEPS, self.path / RESULTS
        self.resume = resume
        self._check()

    def _check(self) -> None:
        if self.resume and not self.last.exists():
            raise CheckpointError(f"--resume: {self.last} does not exist (nothing to resume in {self.path}); "
                                  "drop --resume to start a new run")
        if not self.resume and (self.last.exists() or self.results.exists()):
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it or another --out")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's lock for the block (Busy if another process trains into it), checked again under
        it: that process may have written last.pt since."""
        with hold(self.path / LOCK, f"the run directory {self.path}", wait=False,
                  hint="another training writes into it; wait for it to end, or pass another --out"):
            self._check()
            yield

    def start(self, config: dict[str, Any], step: int) -> None:
        """config.json; metrics of a resumed run cut back to its checkpoint (a kill may have cut a line short)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, json.dumps(config, indent=1) + "\n")
        if not self.resume:
            self.metrics.unlink(missing_ok=True)
            self.steps.unlink(missing_ok=True)
            return
        for stale in self.path.glob(".*.tmp"):  # a write that a kill cut short (never a file we read)
            stale.unlink(missing_ok=True)
        for path in (self.metrics, self.steps):
            if path.exists():
                atomic_write_text(path, "".join(line + "\n" for line in _rows_up_to(path, step)))

    def append(self, row: dict[str, Any], steps: list[dict[str, Any]] = ()) -> None:
        """An evaluation's row, after the per-step rows since the last one (a line a full disk cut short is
        rewritten by the resume, which keeps only the lines up to its checkpoint)."""
        for path, rows in ((self.steps, steps), (self.metrics, [row])):
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            except OSError as e:
                if no_space(e) is None:
                    raise
                raise DiskFull(path, e, kept="its earlier lines are intact", need="a line needs little") from e

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The JSON lines of ``path`` up to ``step``: a resumed run rewrites what came after its checkpoint, including a
    line cut short by the kill."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keep


ETA_AFTER, LONG_RUN_S = 4, 3600.0  # estimate from steps 2-4 of a session; say so when training alone takes hours


def _warn_if_long(device: torch.device, seconds_per_step: float, steps_left: int, recipe: Recipe, bar) -> None:
    """One line, once, when the steps left of a CPU run take more than an hour (evaluations not counted)."""
    eta = seconds_per_step * steps_left
    if device.type != "cpu" or eta < LONG_RUN_S:
        return
    hint = recipe.cheaper()
    bar.write(f"note: on this CPU the {steps_left:,} steps left take about {eta / 3600:.1f} h at "
              f"{seconds_per_step:.2f} s a step, evaluations not counted" + (f"; {hint}" if hint else "") +
              "; a GPU runs it in minutes")


def _check_scheduler(state: dict[str, Any], path: Path) -> None:
    """A resumable last.pt has the engine's ``scheduler``; say which older layout a file without one has."""
    if "scheduler" in state:
        return
    if "schedule" in state:
        raise CheckpointError(f"{path} was written by the ImageNet loop of lra-soft before its shared training "
                              "engine (checkpoint layout lra_soft.checkpoint/1 with a 'schedule' key): it cannot "
                              "be resumed by this version; `imagenet eval` still reads it, or start the run again")
    raise CheckpointError(f"checkpoint {path} lacks ['scheduler']; it is not a last.pt of a training run "
                          f"(keys: {sorted(state)})")


def versions() -> dict[str, str]:
    """Provenance of a run: package versions and the platform."""
    from importlib import metadata

    import numpy
    try:
        ours = metadata.version("lra-soft")
    except metadata.PackageNotFoundError:
        ours = "not installed"
    return {"lra_soft": ours, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------- fit

@dataclass
class _Position:
    """How far a run got, for the message of an error that stops it."""
    step: int = 0
    last_good: int = 0      # the step last.pt holds (0 = none written)
    training: bool = False  # the steps have begun

    def kept(self, run_dir: Path, everyone: bool) -> str:
        who = "every process" if everyone else "the run"
        if not self.training:
            return f"; {who} stopped before training"
        kept = f"the last good checkpoint is {run_dir / LAST} (step {self.last_good}): --resume continues from it" \
            if self.last_good else "no checkpoint was written yet"
        return f"; {who} stopped after step {self.step}, and {kept}"


def fit(recipe: Recipe, run_dir: str | Path, *, device: str = "auto", resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Train ``recipe``, evaluate on its cadence, keep the best, finish; returns results.json (on every process).

    An error of any process stops all of them: ``distributed.ProcessFailed`` with the same message on every
    process (a world of one raises the error itself); the message of that and of a full disk (``DiskFull``) ends
    with the last good checkpoint. SIGINT/SIGTERM end the step under way, write last.pt and raise ``Interrupted``.
    """
    info = D.init_distributed(device)
    at = _Position()
    try:
        try:
            recipe.progress = progress and info.is_main  # bars then show on a terminal only (tqdm's disable=None)
            recipe.setup(info)
            run = RunDir(run_dir, resume)
            announce = (lambda line: tqdm.write(line, file=sys.stderr)) if info.is_main else None
            with run.lock() if info.is_main else contextlib.nullcontext(), StopRequest(announce) as stop:
                return _train(recipe, run, info, progress, stop, at)
        except Exception as e:
            if D.is_dist() and not isinstance(e, COLLECTIVE):
                D.agree(failed=e)  # the others hear of it at their next agreement; all raise ProcessFailed
            raise
    except D.ProcessFailed as e:
        e.args = (f"{e}{at.kept(Path(run_dir), everyone=True)}",)
        raise
    except DiskFull as e:
        e.message += at.kept(Path(run_dir), everyone=D.is_dist())
        raise


def _train(recipe: Recipe, run: RunDir, info: D.DistInfo, progress: bool, stop: StopRequest, at: _Position
           ) -> dict[str, Any]:
    """``fit`` inside the run directory's lock and the stop request; ``at`` follows the step and last.pt."""
    dev, world, rank = info.device, info.world_size, info.rank
    loop = recipe.loop

    # The same initial weights on every process (DDP also broadcasts rank 0's); per-process streams after.
    torch.manual_seed(loop.seed)
    model = recipe.build_model().to(dev)
    torch.manual_seed(loop.seed + rank)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(loop.ema_decay), use_buffers=True) \
        if loop.ema_decay > 0 else None
    optimizer, scheduler = recipe.optimizer(model)
    precision = loop.precision_on(dev)
    scaler = D.grad_scaler(dev, precision)
    # wall: elapsed seconds of all sessions; train_time: seconds inside training steps
    step, best_acc, best_step, wall, train_time = 0, -1.0, 0, 0.0, 0.0
    # since the last evaluation: summed stats, step seconds, per-step rows (in last.pt when a signal stops a run
    # between evaluations, so that the next evaluation's row is the uninterrupted run's); the last evaluation's row
    interval, interval_time, step_rows, row = None, 0.0, [], {}
    if run.resume:
        state = load_checkpoint(run.last, required=("model", "optimizer", "rng", "step", "config"))
        _check_scheduler(state, run.last)
        recipe.check_resume(state, run.last)
        if state["world_size"] != world:
            raise CheckpointError(f"{run.last} was written by {state['world_size']} processes, this run has "
                                  f"{world}; resume with the same number of processes")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
            ema.n_averaged.fill_(state["ema_updates"])
        restore_rng_state(state["rng"][rank])
        step, best_acc, best_step = state["step"], state["best_acc"], state["best_step"]
        wall, train_time = state["wall"], state["train_time"]
        interval, interval_time = state.get("interval"), state.get("interval_time", 0.0)
        interval = None if interval is None else interval.to(dev)
        step_rows, row = list(state.get("step_rows", [])), state["metrics"]
        recipe.load_state(state)
    if info.is_main:
        run.start({**recipe.config_file(), "world_size": world, "device": str(dev), "versions": versions()}, step)
    D.barrier()
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 \
        else None

    def checkpoint_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "ema": None if ema is None else ema.module.state_dict(),
                "ema_updates": 0 if ema is None else int(ema.n_averaged), "config": recipe.config(),
                "step": step, "epoch": step // loop.steps_per_epoch, "metrics": row, **recipe.state()}

    def save_last(rngs: list[object]) -> None:
        save_checkpoint(run.last, {
            **checkpoint_state(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs, "best_acc": best_acc, "best_step": best_step,
            "wall": wall, "train_time": train_time, "world_size": world,
            "interval": interval, "interval_time": interval_time, "step_rows": step_rows})

    last = loop.last_step
    bar = tqdm(total=last, initial=step, disable=None if progress and info.is_main else True, dynamic_ncols=True,
               desc=loop.desc)
    at.step, at.last_good, at.training = step, step, True
    session_start, wall0 = time.perf_counter(), wall
    session_first, eta_start = step, session_start

    def diverged(stats: torch.Tensor) -> None:
        if not torch.isfinite(stats).all():
            bar.close()
            kept = f"the last good checkpoint is {run.last} (step {at.last_good})" if at.last_good else \
                "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {stats[0].item() / stats[1].item()} at step {step + 1}; the run "
                                   f"stopped and {kept}. Lower --lr or check the data, then --resume or start again")

    def stopped() -> Interrupted | None:
        """At a step boundary: if any process was signalled, last.pt at this step and the Interrupted to raise."""
        signum = D.agree(stop=stop.signum)
        if not signum:
            return None
        nonlocal wall
        if at.last_good != step:
            rngs = D.all_gather_objects(capture_rng_state())
            wall = wall0 + time.perf_counter() - session_start
            if info.is_main:
                save_last(rngs)
            D.barrier()
            at.last_good = step
        bar.close()
        return Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {step} of {last}; "
                                   f"{run.last} holds the run at that step")

    while step < last:
        epoch, offset = divmod(step, loop.steps_per_epoch)
        for group in _steps(recipe.micro_batches(epoch, offset), loop.accumulation):
            tic = time.perf_counter()
            stats = train_step(ddp or model, optimizer, group, recipe.loss,
                               autocast=lambda: D.autocast(dev, precision), scaler=scaler,
                               grad_clip=loop.grad_clip, accumulation=loop.accumulation, ddp=ddp, on_stats=diverged)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            at.step = step
            took = time.perf_counter() - tic
            interval = stats if interval is None else interval + stats
            interval_time += took
            train_time += took
            recipe.after_step(stats)
            step_rows.append({"step": step, "loss": stats[0].item() / stats[1].item(),
                              "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(recipe.postfix(stats, took), refresh=False)
            if step == session_first + ETA_AFTER and info.is_main:
                _warn_if_long(dev, (time.perf_counter() - eta_start) / (ETA_AFTER - 1), last - step, recipe, bar)
            elif step == session_first + 1:
                eta_start = time.perf_counter()  # the first step of a session warms up: not in the estimate

            if step % loop.eval_every == 0 or step == last:
                row, score = recipe.record(step, interval, interval_time, model,
                                           None if ema is None else ema.module, optimizer, scheduler)
                steps_done, interval, interval_time, step_rows = step_rows, None, 0.0, []
                improved = score > best_acc
                if improved:
                    best_acc, best_step = score, step
                rngs = D.all_gather_objects(capture_rng_state())
                wall = wall0 + time.perf_counter() - session_start
                if info.is_main:
                    # Order matters for a kill between writes: best.pt, then the metrics line, then last.pt
                    # (a resume from the older last.pt redoes and rewrites all three identically).
                    if improved:
                        save_checkpoint(run.best, {**checkpoint_state(), "val_acc": best_acc})
                    run.append(row, steps_done)
                    save_last(rngs)
                D.barrier()
                at.last_good = step
                if info.is_main and progress:
                    bar.write(recipe.report(row, best_acc, best_step))
            if (interrupted := stopped()) is not None:
                raise interrupted
            if step >= last:
                break
    bar.close()

    best = load_checkpoint(run.best, map_location=dev, required=("model",))
    wall = wall0 + time.perf_counter() - session_start
    results = recipe.finish(model, None if ema is None else ema.module, best, {
        "step": step, "best_acc": best_acc, "best_step": best_step, "wall_time_s": wall, "train_time_s": train_time,
        "precision": precision})
    if info.is_main:
        atomic_write_text(run.results, json.dumps(results, indent=1) + "\n")
        recipe.artifacts(run.path)
    D.barrier()
    return results
