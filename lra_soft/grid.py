"""The LRA table in one command: a grid of runs, tasks x attentions x seeds, on this machine or a Slurm cluster.

A row of the SOFT paper's Table 6 is four tasks, a comparison is several attentions, and a result a reviewer accepts
is several seeds. ``make_plan`` turns that into one ``Run`` per (task, attention, seed), each the exact ``train``
command of its directory ``RUNS/TASK/ATTENTION/seedN``, the directory ``train`` itself writes (config.json,
metrics.jsonl, last.pt, best.pt, results.json), with two files more: ``train.log`` (everything the run printed, every
attempt) and ``grid.json`` (each attempt's command, host, start, end and exit status).

    plan = make_plan(GridConfig(tasks=("listops", "text"), attentions=tuple(parse_specs(["soft", "softmax"])),
                                seeds=(0, 1)))
    prepare_data(config)                      # each task's cache, once, before any job starts
    launch_local(plan)                        # one run after another; one per GPU (group) when several are visible
    jobs = launch_slurm(plan, executor)       # one submitit job per run
    table(plan)                               # mean, std and n per cell, beside Table 6 where comparable

Every run is ``python -m cli train ...`` in a process of its own (``torchrun`` for several GPUs per job), so a crash
of one run never ends the grid. Its state is read from its directory alone, so every launcher and every later
invocation agrees on it:

- ``done``: results.json exists. Never run again.
- ``running``: a process holds ``.grid.lock`` in the directory, an flock the kernel releases when the process ends,
  even by SIGKILL. The training process holds it too, so it counts while training goes on after its launcher died.
- ``failed``: the last attempt exited with an error; ``train.log`` says why. A new invocation tries again.
- ``interrupted``: last.pt exists, or an attempt started and never got an exit status (killed, timed out, preempted).
  It is continued with ``--resume`` from last.pt, or started afresh when it died before its first checkpoint.
- ``pending``: nothing yet.
- ``conflict``: grid.json records other training arguments than the plan's (other steps, options, data). The grid
  refuses to start rather than mix two experiments in one directory.

On Slurm a run's job is checkpointable (submitit's protocol): on a timeout or preemption signal it stops its training
and requeues itself, and the requeued job resumes from last.pt, which the engine writes at every evaluation.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

from lra_soft.atomic import atomic_write_text
from lra_soft.bench.specs import AttentionSpec
from lra_soft.curves import read_jsonl
from lra_soft.engine import CONFIG, LAST, METRICS, RESULTS

RECORD, LOG, LOCK = "grid.json", "train.log", ".grid.lock"
STATES = ("done", "running", "interrupted", "failed", "pending", "conflict")
TABLE_STEM = "grid"  # RUNS/grid.{md,json,csv,png}

# Training options of ``train`` that a grid sets for every run, in the order they go on the command line; the keys
# are those of lra_soft.train.resolve_configs.
TRAIN_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup": "--warmup",
               "eval_every": "--eval-every", "eval_batches": "--eval-batches", "pad_to": "--pad-to",
               "max_len": "--max-len", "dropout": "--dropout", "pooling": "--pooling", "precision": "--precision"}
# Arguments that say where or how a run executes, not what it trains: a change of them is no conflict (--out: the
# directory itself, which may have moved); the first two take a value.
_NOT_THE_EXPERIMENT = ("--device", "--out", "--resume", "--no-progress")
STOP_GRACE_S = 60.0  # a stopped training gets this long after SIGTERM before SIGKILL
PROBE_S = 5.0        # --dry-run on a CPU: the longest step timed before extrapolating to the run's batch


@dataclass(frozen=True)
class GridConfig:
    tasks: tuple[str, ...]                         # keys of tasks.TASKS
    attentions: tuple[AttentionSpec, ...]          # lra_soft.bench.parse_specs of the --attn values
    seeds: tuple[int, ...] = (0, 1, 2)
    protocol: str = "paper"                        # a key of lra_soft.protocol.PROTOCOLS
    runs: Path = Path("runs/grid")                 # RUNS/TASK/ATTENTION/seedN
    data_dir: Path = Path("data/cache")            # prepared caches, DATA_DIR/TASK (train's --data-dir)
    sources: dict[str, str] = field(default_factory=dict)                   # task -> --source; absent: the default
    data_options: dict[str, dict[str, Any]] = field(default_factory=dict)   # task -> --data-option values
    train: dict[str, Any] = field(default_factory=dict)                     # TRAIN_FLAGS key -> value, every run
    device: str = "auto"                           # train's --device inside each job


@dataclass(frozen=True)
class Run:
    task: str
    attention: AttentionSpec
    seed: int
    path: Path                  # the run directory
    args: tuple[str, ...]       # train's arguments (after ``cli train``), without --resume

    @property
    def name(self) -> str:
        """TASK/ATTENTION/seedN, as under the grid's root."""
        return f"{self.task}/{self.path.parent.name}/{self.path.name}"

    def command(self, *, resume: bool = False, gpus: int = 1, python: str = sys.executable) -> list[str]:
        """The process that trains this run: ``python -m cli train ...``, under torchrun for several GPUs."""
        launcher = [python] if gpus == 1 else [python, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", str(gpus)]
        return [*launcher, "-m", "cli", "train", *self.args, *(["--resume"] if resume else [])]

    def shell(self, *, resume: bool = False) -> str:
        """The command as a user would type it."""
        return shlex.join(["python", "cli.py", "train", *self.args, *(["--resume"] if resume else [])])


@dataclass(frozen=True)
class RunState:
    run: Run
    state: str                      # one of STATES
    step: int = 0                   # last evaluated (checkpointed) step, from metrics.jsonl
    steps: int | None = None        # the run's total steps, from config.json
    test_acc: float | None = None   # done: test accuracy (fraction)
    note: str = ""                  # failed: the error line of the log; conflict: what differs; running: where

    @property
    def log(self) -> Path:
        return self.run.path / LOG


# --------------------------------------------------------------------------------------------------- pure helpers

def _value(value: Any) -> str:
    """A value as parse_options reads it back (a string bare, a tuple without spaces: one shell word)."""
    return str(value).replace(" ", "") if isinstance(value, (tuple, list)) else str(value)


def attention_dir(spec: AttentionSpec) -> str:
    """The directory of an attention: its name and options, sorted (soft-num_landmarks=64)."""
    return spec.name + "".join(f"-{k}={_value(v)}" for k, v in sorted(spec.options.items()))


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2); ``0-4`` -> (0, 1, 2, 3, 4); distinct non-negative integers."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, dash, high = part.partition("-")
            seeds += range(int(low), int(high) + 1) if dash else [int(part)]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2 or 0-4")
    return tuple(seeds)


def per_task(items: Iterable[str], flag: str, sep: str, tasks: Iterable[str]) -> dict[str, list[str]]:
    """``["listops=data/x", "text=hf:imdb"]`` (sep "=") or ``["text:val=test"]`` (sep ":") -> {task: [values]};
    the task must be one of the grid's."""
    tasks = list(tasks)
    out: dict[str, list[str]] = {}
    for item in items:
        task, found, value = item.partition(sep)
        if not found or not value:
            raise ValueError(f"{flag} {item}: give TASK{sep}VALUE, e.g. {flag} listops{sep}"
                             f"{'data/lra/listops' if sep == '=' else 'key=value'}")
        if task not in tasks:
            raise ValueError(f"{flag} {item}: task {task!r} is not in this grid ({', '.join(tasks)})")
        out.setdefault(task, []).append(value)
    return out


def _absolute(path: str | Path) -> str:
    """A local path made absolute (a Slurm job may start elsewhere); hf:REPO and tfds:NAME as they are."""
    text = str(path)
    return text if text.startswith(("hf:", "tfds:")) else str(Path(text).expanduser().resolve())


def train_args(cfg: GridConfig, task: str, spec: AttentionSpec, seed: int, path: Path) -> tuple[str, ...]:
    """train's arguments of one run (after ``cli train``)."""
    args = [task, "--attn", spec.name]
    for key, value in sorted(spec.options.items()):
        args += ["-o", f"{key}={_value(value)}"]
    args += ["--protocol", cfg.protocol, "--seed", str(seed), "--out", _absolute(path),
             "--data-dir", _absolute(cfg.data_dir)]
    if task in cfg.sources:
        args += ["--source", _absolute(cfg.sources[task])]
    for key, value in sorted(cfg.data_options.get(task, {}).items()):
        args += ["--data-option", f"{key}={_value(value)}"]
    for key, flag in TRAIN_FLAGS.items():
        if cfg.train.get(key) is not None:
            args += [flag, _value(cfg.train[key])]
    return tuple(args + ["--device", cfg.device, "--no-progress"])


def _experiment(args: Iterable[str]) -> list[str]:
    """train's arguments without those that only say where and how the run executes."""
    out: list[str] = []
    args = iter(args)
    for a in args:
        if a in _NOT_THE_EXPERIMENT[:2]:
            next(args, None)
        elif a not in _NOT_THE_EXPERIMENT:
            out.append(a)
    return out


def _difference(recorded: list[str], planned: list[str]) -> str:
    """What a recorded run's arguments have that the plan's lack, flag by flag (every flag left takes a value)."""
    def pairs(args: list[str]) -> list[str]:
        return args[:1] + [" ".join(args[i:i + 2]) for i in range(1, len(args), 2)]
    ours = pairs(planned)
    return ", ".join(p for p in pairs(recorded) if p not in ours) or "the same arguments in another order"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"


def _error_line(log: Path) -> str:
    """What a failed run's log says last: its ``error:`` line, else its last line."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


# --------------------------------------------------------------------------------------------------- the plan

def make_plan(cfg: GridConfig) -> list[Run]:
    """One Run per (task, attention, seed), tasks outermost: a partly finished grid has whole tasks to show."""
    runs = []
    for task in cfg.tasks:
        for spec in cfg.attentions:
            for seed in cfg.seeds:
                path = Path(cfg.runs) / task / attention_dir(spec) / f"seed{seed}"
                runs.append(Run(task, spec, seed, path, train_args(cfg, task, spec, seed, path)))
    return runs


def resolve(cfg: GridConfig, task: str, spec: AttentionSpec, manifest: dict[str, Any] | None = None):
    """(EncoderConfig, TrainConfig) of the grid's runs of ``task`` with ``spec``, as ``train`` resolves them (with
    the prepared data's vocabulary, classes and length when ``manifest`` is given)."""
    import tasks

    from lra_soft import protocol as P
    from lra_soft.train import resolve_configs

    module = tasks.get_task(task)
    data = {k: (manifest or {}).get(k) for k in ("vocab_size", "num_classes")}
    overrides = {k: v for k, v in cfg.train.items() if k != "max_len"}
    max_len = cfg.train.get("max_len") or (manifest or {}).get("max_len")
    return resolve_configs(module.MODEL, module.TRAIN, protocol=P.get_protocol(cfg.protocol, task),
                           attention=spec.name, attention_options=dict(spec.options), max_len=max_len,
                           seed=None, **data, **overrides)


def data_options(cfg: GridConfig, task: str) -> dict[str, Any]:
    """The data options train prepares ``task`` with: the protocol's, then the grid's."""
    from lra_soft import protocol as P

    return {**P.get_protocol(cfg.protocol, task).data_options, **cfg.data_options.get(task, {})}


def prepare_data(cfg: GridConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Each task's cache, built (or found) once here, before any job: the jobs then only open it."""
    import tasks

    for task in cfg.tasks:
        source = cfg.sources.get(task)
        cache = tasks.prepare(task, Path(_absolute(source)) if source else None, Path(_absolute(cfg.data_dir)),
                              progress=progress, **data_options(cfg, task))
        counts = tasks.manifest(cache)["counts"]
        log(f"data {task}: {cache} ({', '.join(f'{k} {v:,}' for k, v in counts.items())})")


# --------------------------------------------------------------------------------------------------- run state

def _record(run: Run) -> dict[str, Any]:
    try:
        return json.loads((run.path / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_record(run: Run, record: dict[str, Any]) -> None:
    atomic_write_text(run.path / RECORD, json.dumps(record, indent=1) + "\n")


def _try_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` (created): its descriptor, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a filesystem without flock (some Lustre mounts): runs go unlocked, a running one looks interrupted
        pass
    return fd


def _locked(run: Run) -> bool:
    if not (run.path / LOCK).exists():
        return False
    fd = _try_lock(run.path / LOCK)
    if fd is None:
        return True
    os.close(fd)
    return False


def read_state(run: Run, *, check_lock: bool = True) -> RunState:
    """The state of ``run`` from its directory (see the module's docstring)."""
    record = _record(run)
    recorded, planned = _experiment(record.get("args", [])), _experiment(run.args)
    if record and recorded != planned:
        return RunState(run, "conflict", note=f"{run.path} holds a run of other train arguments "
                                              f"({_difference(recorded, planned)}); use another --runs, or delete "
                                              "that run directory")
    try:
        steps = json.loads((run.path / CONFIG).read_text())["train"]["steps"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        steps = None
    rows = read_jsonl(run.path / METRICS)
    step = rows[-1].get("step", 0) if rows else 0
    if (run.path / RESULTS).exists():
        try:
            acc = json.loads((run.path / RESULTS).read_text()).get("test_acc")
        except json.JSONDecodeError:
            acc = None
        return RunState(run, "done", step, steps, acc)
    if check_lock and _locked(run):
        last = (record.get("attempts") or [{}])[-1]
        return RunState(run, "running", step, steps, note=f"on {last.get('host', '?')} (pid {last.get('pid')})")
    attempt = (record.get("attempts") or [None])[-1]
    if attempt and (attempt.get("returncode") or 0) > 0 and not attempt.get("interrupted"):
        return RunState(run, "failed", step, steps, note=_error_line(run.path / LOG))
    if (run.path / LAST).exists() or attempt:
        return RunState(run, "interrupted", step, steps)
    return RunState(run, "pending", step, steps)


def states(plan: Iterable[Run]) -> list[RunState]:
    return [read_state(run) for run in plan]


def status_table(found: list[RunState]) -> str:
    """A Markdown table of the runs' states, then the count of each state."""
    lines = ["| task | attention | seed | state | step | test acc. | notes |", "|---|---|---|---|---|---|---|"]
    for s in found:
        step = f"{s.step:,} / {s.steps:,}" if s.steps else (f"{s.step:,}" if s.step else "–")
        acc = "–" if s.test_acc is None else f"{100 * s.test_acc:.2f}%"
        note = s.note + (f"; log {s.log}" if s.state == "failed" else "")
        lines.append(f"| {s.run.task} | {s.run.attention.label or s.run.attention.name} | {s.run.seed} | {s.state} "
                     f"| {step} | {acc} | {note} |")
    counts = {state: sum(s.state == state for s in found) for state in STATES}
    lines.append("\n" + ", ".join(f"{n} {state}" for state, n in counts.items() if n) + f" of {len(found)} runs")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- one run

def execute(run: Run, *, gpus: int = 1, env: dict[str, str] | None = None,
            started: Callable[[subprocess.Popen], None] = lambda proc: None) -> RunState:
    """Train ``run`` to its end in a subprocess (resuming from last.pt) unless it is done or running elsewhere;
    its output goes to train.log and each attempt into grid.json. Returns the state it ended in.

    The run's lock is held by this process and by the training, so that it stays taken while the training lives.
    An exception here (KeyboardInterrupt, a job's timeout) stops the training first and records the attempt as
    interrupted."""
    fd = _try_lock(run.path / LOCK)
    if fd is None:
        return read_state(run)
    try:
        state = read_state(run, check_lock=False)
        if state.state in ("done", "conflict"):
            return state
        resume = (run.path / LAST).exists()
        command = run.command(resume=resume, gpus=gpus)
        record = _record(run) or {"args": list(run.args), "attempts": []}
        attempt = {"command": command, "resume": resume, "host": socket.gethostname(), "pid": os.getpid(),
                   "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
                   "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time(), "ended": None,
                   "returncode": None}
        record["attempts"].append(attempt)
        _write_record(run, record)
        with open(run.path / LOG, "a", encoding="utf-8") as log:
            log.write(f"\n=== attempt {len(record['attempts'])} on {attempt['host']} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(fd,), env={**os.environ, **(env or {})})
            started(proc)
            try:
                returncode = proc.wait()
            except BaseException:
                stop(proc)
                attempt.update(ended=time.time(), returncode=proc.returncode, interrupted=True)
                _write_record(run, record)
                raise
        attempt.update(ended=time.time(), returncode=returncode, interrupted=returncode < 0)
        _write_record(run, record)
        return read_state(run, check_lock=False)
    finally:
        os.close(fd)


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (torchrun passes it to its workers), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def describe(s: RunState) -> str:
    """One line: the state, with the test accuracy, the step reached or the error and log."""
    if s.state == "done":
        return "done" + ("" if s.test_acc is None else f", test {100 * s.test_acc:.2f}%")
    if s.state == "failed":
        return f"failed: {s.note or 'see the log'}; log {s.log}"
    return s.state + (f" at step {s.step:,}" if s.step else "") + (f" {s.note}" if s.note else "")


# --------------------------------------------------------------------------------------------------- launchers

def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named:
        return [d.strip() for d in named.split(",") if d.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: list[str], per_job: int) -> list[str | None]:
    """Disjoint groups of ``per_job`` devices (CUDA_VISIBLE_DEVICES values); [None] = one job at a time, devices
    as they are (a CPU machine, or one GPU per job with a single GPU)."""
    if not gpus:
        if per_job > 1:
            raise ValueError(f"--gpus-per-job {per_job}: this machine has no CUDA device")
        return [None]
    if per_job > len(gpus):
        raise ValueError(f"--gpus-per-job {per_job}: only {len(gpus)} CUDA device(s) are visible "
                         f"({','.join(gpus)})")
    return [",".join(gpus[i:i + per_job]) for i in range(0, len(gpus) - per_job + 1, per_job)]


def to_run(found: list[RunState]) -> list[Run]:
    """The runs a launcher starts: all but done and running ones (a conflict stops the grid before this)."""
    return [s.run for s in found if s.state in ("pending", "interrupted", "failed")]


def check_conflicts(found: list[RunState]) -> None:
    conflicts = [s for s in found if s.state == "conflict"]
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise ValueError(conflicts[0].note + more)


def launch_local(plan: list[Run], *, gpus_per_job: int = 1, gpus: list[str] | None = None,
                 log: Callable[[str], None] = print, limit: int = 0) -> list[RunState]:
    """Run every run of ``plan`` that is not done, on this machine: one after another, or one per group of
    ``gpus_per_job`` visible GPUs at a time. ``limit`` > 0 stops after that many runs were started. Returns the
    final state of every run of the plan."""
    found = states(plan)
    check_conflicts(found)
    slots = gpu_slots(visible_gpus() if gpus is None else gpus, gpus_per_job)
    todo = to_run(found)[:limit] if limit else to_run(found)
    for s in found:
        if s.state in ("done", "running"):
            log(f"{s.run.name}: {describe(s)}")
    free: Queue = Queue()
    for slot in slots:
        free.put(slot)
    results: dict[Path, RunState] = {}
    lock = threading.Lock()

    def one(i: int, run: Run) -> None:
        slot = free.get()
        try:
            before = read_state(run)
            where = f" on GPU {slot}" if slot is not None else ""
            resume = f", resuming from step {before.step:,}" if (run.path / LAST).exists() else ""
            log(f"[{i}/{len(todo)}] {run.name}: {before.state}{resume}, starting{where}")
            tic = time.perf_counter()
            end = execute(run, gpus=gpus_per_job, env=None if slot is None else {"CUDA_VISIBLE_DEVICES": slot})
            with lock:
                results[run.path] = end
            log(f"[{i}/{len(todo)}] {run.name}: {describe(end)} ({_hours(time.perf_counter() - tic)})")
        finally:
            free.put(slot)

    if len(slots) == 1:
        for i, run in enumerate(todo, 1):  # in this thread, so that Ctrl-C and signals reach the training's wait
            one(i, run)
    else:
        threads = [threading.Thread(target=one, args=(i, run), daemon=True) for i, run in enumerate(todo, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [results.get(run.path) or read_state(run) for run in plan]


class RunJob:
    """One run as a submitit job: calling it trains the run (resuming where it stopped). On a timeout or a
    preemption submitit calls ``checkpoint``, which stops the training and hands back a fresh job of the same run
    to requeue; that job resumes from last.pt. When every run of ``table_plan`` is done or failed, the job that
    saw it last writes the grid's table."""

    def __init__(self, run: Run, gpus: int = 1, table_plan: tuple[Run, ...] = (), table_root: Path | None = None):
        self.run, self.gpus, self.table_plan, self.table_root = run, gpus, tuple(table_plan), table_root
        self._child: subprocess.Popen | None = None

    def __call__(self) -> dict[str, Any]:
        end = execute(self.run, gpus=self.gpus, started=self._started)
        if self.table_root is not None and all(s.state in ("done", "failed") for s in states(self.table_plan)):
            table(self.table_plan, self.table_root)
        return {"run": str(self.run.path), "state": end.state, "test_acc": end.test_acc, "note": end.note}

    def _started(self, proc: subprocess.Popen) -> None:
        self._child = proc

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        if self._child is not None:
            stop(self._child)
        return DelayedSubmission(RunJob(self.run, self.gpus, self.table_plan, self.table_root))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}  # a process handle is never pickled into a requeue


def slurm_executor(folder: Path, *, cluster: str = "slurm", partition: str | None = None, timeout_min: int = 4320,
                   gpus_per_job: int = 1, cpus_per_task: int | None = None, name: str = "lra-grid",
                   options: dict[str, Any] | None = None):
    """A submitit AutoExecutor for one run per job: one node, one task (the job's torchrun starts one process per
    GPU), ``gpus_per_job`` GPUs. ``options``: further parameters for Slurm, e.g. {"account": "x", "qos": "y"}.
    ``cluster`` "local" or "debug" runs the same jobs on this machine (submitit's own executors)."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher slurm needs submitit: pip install 'lra-soft[slurm]'") from None

    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:  # no srun on this machine
        raise ValueError(f"--launcher slurm: {e} Submit from a login node of the cluster, or use --launcher "
                         "local") from None
    params: dict[str, Any] = {"name": name, "timeout_min": timeout_min, "nodes": 1, "tasks_per_node": 1,
                              "gpus_per_node": gpus_per_job,
                              "cpus_per_task": cpus_per_task or max(2, 8 * gpus_per_job)}
    if partition:
        params["slurm_partition"] = partition
    params.update({f"slurm_{k}": v for k, v in (options or {}).items()})
    if cluster == "local":  # the local executor cannot be given GPUs this machine lacks
        params["gpus_per_node"] = min(gpus_per_job, len(visible_gpus()))
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError) as e:
        raise ValueError(f"--slurm-option: {e}") from None
    return executor


def launch_slurm(plan: list[Run], executor, *, gpus_per_job: int = 1, root: Path | None = None,
                 log: Callable[[str], None] = print) -> list[tuple[Run, Any]]:
    """Submit one job per run that is not done or running; returns (run, submitit job) pairs."""
    found = states(plan)
    check_conflicts(found)
    todo = to_run(found)
    for s in found:
        if s.state in ("done", "running"):
            log(f"{s.run.name}: {describe(s)}")
    jobs = []
    if todo:
        with executor.batch():  # one array job on Slurm
            for run in todo:
                jobs.append((run, executor.submit(RunJob(run, gpus_per_job, tuple(plan), root))))
    for run, job in jobs:
        log(f"{run.name}: submitted as job {job.job_id} ({read_state(run).state})")
    return jobs


# --------------------------------------------------------------------------------------------------- the table

def table(plan: list[Run], root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """The table of the plan's finished runs (lra_soft.results: mean, std and n per cell, Table 6 beside comparable
    cells), written to ROOT/grid.{md,json,csv,png}; ([], []) when no run is done."""
    from lra_soft import results as R

    done = [R.read_run(run.path) for run in plan if (run.path / RESULTS).exists()]
    if not done:
        return [], []
    rows = R.summarize(done)
    return rows, R.save(rows, root, TABLE_STEM)


# --------------------------------------------------------------------------------------------------- cost

@dataclass(frozen=True)
class Estimate:
    """The cost of one run from one measured training step and one inference forward."""
    step_s: float | None            # one optimizer step, per process
    infer_s: float | None           # one evaluation batch, per process
    steps: int
    eval_batches: int | None        # dev batches over the run plus the test split; None: data not prepared
    shape: str                      # what was measured: batch x tokens on the device
    error: str = ""

    @property
    def seconds(self) -> float | None:
        if self.step_s is None:
            return None
        return self.steps * self.step_s + (self.eval_batches or 0) * (self.infer_s or 0.0)


def estimate(cfg: GridConfig, task: str, spec: AttentionSpec, *, gpus: int = 1, measure: bool = True,
             repeats: int = 2) -> Estimate:
    """One run's cost: a training step and an inference forward of its model at its batch (per process; on a CPU
    extrapolated from smaller batches when a step takes long) and padded length (``pad_to``, else ``max_len``: the longest a batch can be) measured
    here (lra_soft.bench), times its steps and evaluations. Without a prepared cache the evaluations are left out;
    with ``measure=False`` only the counts."""
    import tasks

    from lra_soft.distributed import resolve_device

    cache = Path(_absolute(cfg.data_dir)) / task
    try:
        manifest = tasks.manifest(cache)
    except FileNotFoundError:
        manifest = None
    model, train = resolve(cfg, task, spec, manifest)
    n = min(train.pad_to, model.max_len) if train.pad_to else model.max_len
    batch = max(1, train.batch_size // gpus)
    evals = train.steps // train.eval_every + (1 if train.steps % train.eval_every else 0)
    eval_batches = None
    if manifest is not None:
        counts = manifest["counts"]
        per_eval = train.eval_batches or math.ceil(counts["val"] / train.batch_size)
        eval_batches = evals * per_eval + math.ceil(counts["test"] / train.batch_size)
    device = resolve_device(cfg.device)
    shape = f"{batch} x {n}{' x 2' if model.pair else ''} tokens on {device}"
    if not measure:
        return Estimate(None, None, train.steps, eval_batches, shape)
    autocast = {"fp16": "float16", "bf16": "bfloat16"}.get(train.precision, "none") if device.type == "cuda" \
        else "none"
    try:
        got = _time_at_batch(model, batch, n, device, autocast, repeats)
    except (ValueError, RuntimeError) as e:  # the run would fail the same way at its first step
        return Estimate(None, None, train.steps, eval_batches, shape, error=f"fails: {e}")
    if "error" in got:
        return Estimate(None, None, train.steps, eval_batches, shape, error=got["error"])
    if got["timed_at"] != batch:
        shape += f" (timed at batch {got['timed_at'] // 2} and {got['timed_at']}, extrapolated)"
    return Estimate(got["step_s"], got["infer_s"], train.steps, eval_batches, shape)


def _time_at_batch(model, batch: int, n: int, device, autocast: str, repeats: int) -> dict[str, Any]:
    """Step and inference seconds at ``batch``. A GPU is timed at it. A CPU, where a paper-setting step at batch 32
    takes minutes, is timed at batches 1, 2, 4, ... while a step stays under PROBE_S; past that, the line through
    the last two timings (a step's fixed part, the optimizer's, plus a part per example) is extrapolated to
    ``batch``."""
    from lra_soft.bench.model import time_encoder_step

    if device.type == "cuda":
        return {**time_encoder_step(model, batch, n, device=str(device), autocast=autocast, repeats=repeats),
                "timed_at": batch}
    points: list[tuple[int, dict[str, Any]]] = []
    probe = 1
    while True:
        got = time_encoder_step(model, min(probe, batch), n, device=str(device), repeats=repeats)
        if "error" in got:
            return got
        points.append((min(probe, batch), got))
        if probe >= batch:
            return {**got, "timed_at": batch}
        if got["step_s"] > PROBE_S and len(points) >= 2:
            break
        probe *= 2
    (b0, t0), (b1, t1) = points[-2], points[-1]

    def line(key: str) -> float:
        slope = max(0.0, (t1[key] - t0[key]) / (b1 - b0))
        return t1[key] + slope * (batch - b1)
    return {"step_s": line("step_s"), "infer_s": line("infer_s"), "timed_at": b1}


def dry_run(cfg: GridConfig, plan: list[Run], *, gpus_per_job: int = 1, measure: bool = True,
            log: Callable[[str], None] = print) -> str:
    """The plan: a Markdown table of each run's state and estimated cost, the total of what is left, and the
    command each run still to do will start with."""
    found = states(plan)
    cells: dict[tuple[str, str], Estimate] = {}
    for s in found:
        key = (s.run.task, attention_dir(s.run.attention))
        if key not in cells and s.state != "done":
            if measure:
                log(f"measuring one step of {s.run.task} / {s.run.attention.label or s.run.attention.name}")
            cells[key] = estimate(cfg, s.run.task, s.run.attention, gpus=gpus_per_job, measure=measure)
    lines = ["| run | state | one step (per process) | steps | evaluation batches | estimated cost |",
             "|---|---|---|---|---|---|"]
    left, unknown, commands = 0.0, 0, []
    for s in found:
        if s.state == "done":
            lines.append(f"| {s.run.name} | {describe(s)} | – | – | – | – |")
            continue
        est = cells[(s.run.task, attention_dir(s.run.attention))]
        step = est.error or ("not measured" if est.step_s is None else f"{est.step_s:.3g} s ({est.shape})")
        seconds = est.seconds
        if seconds is None:
            unknown += 1
        else:
            left += seconds * max(0.0, 1 - s.step / est.steps) if s.state == "interrupted" else seconds
        evals = "data not prepared" if est.eval_batches is None else f"{est.eval_batches:,}"
        lines.append(f"| {s.run.name} | {describe(s)} | {step} | {est.steps:,} | {evals} | {_hours(seconds)} |")
        if s.state != "running":
            commands.append(s.run.shell(resume=(s.run.path / LAST).exists()))
    counts = ", ".join(f"{sum(s.state == st for s in found)} {st}" for st in STATES
                       if any(s.state == st for s in found))
    measured = len(found) - unknown - sum(s.state == "done" for s in found)
    total = "nothing measured" if not measured else _hours(left) + (f" (+ {unknown} runs not measured)"
                                                                     if unknown else "")
    per = f" x {gpus_per_job} GPUs" if gpus_per_job > 1 else ""
    lines += ["", f"{len(plan)} runs ({counts}). Left to run: {total} of jobs{per}, one after another (the steps at "
              "the measured step time, the evaluations at the measured inference time per batch; data preparation "
              "not counted).", "", "Commands:", "", *commands]
    return "\n".join(lines)
