"""lra-soft command line: a thin Typer layer over ``lra_soft`` and ``tasks``.

    python cli.py --help

Every option is checked before any data is read. A mistake Typer itself finds (an unknown flag, a value that is not
of the flag's type or not among its listed choices) is a usage error: Typer's message, exit code 2. Every other
mistake is one line ``error: FLAG VALUE: what is wrong``, exit code 1, without a traceback (``LRA_SOFT_DEBUG=1``
prints it first).
"""
from __future__ import annotations

import hashlib
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional

import typer

from lra_soft.attention import ATTENTION, COST, attention_options
from lra_soft.config import parse_options
from lra_soft.atomic import DiskFull
from lra_soft.distributed import DEVICES, ProcessFailed
from lra_soft.imagenet import ImageNetConfig
from lra_soft.interrupt import raise_on_sigterm
from lra_soft.locks import Busy

# Choices of the options below, listed by --help and by the error for any other value; tests/test_cli_choices.py
# checks each against the names the library itself accepts.
Pooling = Literal["mean", "mean_padded", "cls"]                       # lra_soft.encoder.POOLINGS
ProtocolName = Literal["paper", "clean"]                              # lra_soft.protocol.PROTOCOLS
Precision = Literal["fp16", "bf16", "fp32"]                           # lra_soft.protocol.PRECISIONS
Split = Literal["val", "test"]
DType = Literal["float32", "float64", "bfloat16", "float16"]          # lra_soft.bench.attention.DTYPES
Autocast = Literal["none", "bfloat16", "float16"]
BenchModel = Literal["none", "lra", "imagenet"]
Backbone = Literal["soft_tiny", "soft_small", "soft_medium", "soft_large", "soft_huge"]  # lra_soft.vision.PRESETS

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


@app.callback()
def _setup(
    malloc_tuning: Annotated[bool, typer.Option(help="Keep freed large CPU blocks for reuse instead of page-faulting "
                                                     "them afresh (glibc mallopt, see lra_soft/allocator.py): faster "
                                                     "long sequences on CPU; the peak heap stays allocated.")] = True,
) -> None:
    raise_on_sigterm()  # SIGTERM unwinds like Ctrl-C: every clean-up runs (temporary files, a cache being built)
    from lra_soft import allocator

    if malloc_tuning:
        allocator.keep_freed_memory()
    else:  # untuned means untuned: soft_attention's own first-use tuning is off too
        allocator.set_lazy_tuning(False)


def _task_data(task: str, source: Optional[Path], data_dir: Path, data_options: dict, progress: bool):
    """Prepare (or reuse) the task's cache and wrap its three splits for the training loop."""
    import tasks

    from lra_soft import distributed as D
    from lra_soft.train import TaskData

    # Rank 0 builds the cache; the others wait, then find it complete.
    if D.is_main():
        cache = tasks.prepare(task, source, data_dir, progress=progress, **data_options)
    D.barrier()
    if not D.is_main():
        cache = tasks.prepare(task, source, data_dir, progress=False, **data_options)
    manifest, splits = _open_splits(task, source, data_dir, data_options, cache)
    summary = {k: manifest.get(k) for k in ("task", "counts", "max_len", "options", "tokenizer_version")}
    if manifest.get("arrays"):  # the build's fingerprint: a resume refuses a cache rebuilt since the run began
        summary["arrays_sha256"] = hashlib.sha256(json.dumps(manifest["arrays"], sort_keys=True).encode()).hexdigest()
    return TaskData(task, splits["train"], splits["val"], splits["test"], tasks.collate, vocab=list(manifest["vocab"]),
                    source={"cache": str(cache), **summary}), manifest


def _open_splits(task: str, source: Optional[Path], data_dir: Path, data_options: dict, cache: Path,
                 tries: int = 3) -> tuple[dict, dict]:
    """The manifest and the three splits of one and the same build of the cache, built with our options.

    Another process may rebuild the cache (with other --data-option values, or after finding it corrupt) between our
    prepare, the manifest read and the opening of the splits. Each split maps its arrays when opened and records the
    hashes it was checked against, so a second prepare (which rebuilds nothing when the cache matches our options)
    and a second manifest read tell whether all of them saw the same build; if not, open them again."""
    import tasks

    for _ in range(tries):
        manifest = tasks.manifest(cache)
        splits = {split: tasks.load(task, cache, split) for split in ("train", "val", "test")}
        tasks.prepare(task, source, data_dir, progress=False, **data_options)  # a no-op unless the cache changed
        again = tasks.manifest(cache)
        seen = [getattr(ds, "records", None) for ds in splits.values()]
        if again == manifest and all(r is None or r == manifest.get("arrays") for r in seen):
            return manifest, splits
    raise tasks.DataError(f"{cache}: the cache was rebuilt {tries} times while this job opened it; is another job "
                          "preparing the same --data-dir with other --data-option values? Give this one its own "
                          "--data-dir")


def _size(n: int) -> str:
    """Bytes as du -h counts them (binary units)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _fail(e: Exception) -> NoReturn:
    """A user's mistake: one line on stderr, exit code 1; LRA_SOFT_DEBUG=1 prints the traceback first."""
    if os.environ.get("LRA_SOFT_DEBUG") == "1":
        if e.__traceback__ is None:
            traceback.print_stack()
        else:
            traceback.print_exception(e)
    typer.echo(f"error: {_one_line(e)}", err=True)
    raise typer.Exit(1)


def _one_line(e: Exception) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker (torch puts "Caught X in DataLoader worker
    process N" and the worker's whole traceback into the message) the worker's own last line, and which worker."""
    text = str(e)
    head, sep, trace = text.partition("\nOriginal Traceback (most recent call last):\n")
    if not sep:
        return text
    last = [line for line in trace.splitlines() if line.strip()][-1]
    name = type(e).__name__
    last = last[len(name) + 2:] if last.startswith(name + ": ") else last
    where = head.strip().removeprefix(f"Caught {name} in ").rstrip(".")
    return f"{last} (in {where})"


RUN_ERRORS = (Busy, DiskFull, ProcessFailed)  # a run refused or stopped: its message says what is kept


def _stopped(e: KeyboardInterrupt, ctx: Optional[typer.Context] = None, run_dir: Optional[Path] = None) -> NoReturn:
    """Ctrl-C or SIGTERM: one line, what is kept and how to go on; exit code 130 / 143 (128 + the signal)."""
    line = str(e) or "stopped by SIGINT"
    if ctx is not None and run_dir is not None and (Path(run_dir) / "last.pt").exists():
        command = _command_line(ctx) + ("" if ctx.params.get("resume") else " --resume")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            command = "torchrun [the same options] " + command.removeprefix("python ")
        line += f"; to continue: {command}"
    else:
        line += "; nothing half-written is kept: run the command again"
    typer.echo(f"interrupted: {line}", err=True)
    raise typer.Exit(getattr(e, "exit_code", 130))


def _rule(test: Callable[[Any], bool], rule: str) -> Callable:
    """A parse-time check of a number option (each item of a repeated one); the error names flag, value and rule."""
    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not test(v):
                _fail(ValueError(f"{param.opts[0]} {v}: {rule}"))
        return value
    return check


AT_LEAST_1 = _rule(lambda v: v >= 1, "must be >= 1")
AT_LEAST_0 = _rule(lambda v: v >= 0, "must be >= 0")
POSITIVE = _rule(lambda v: v > 0, "must be > 0")
FRACTION = _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")


def _check_task(value: str) -> str:
    import tasks

    if value not in tasks.TASKS:
        _fail(ValueError(f"TASK {value}: unknown task; choose from {', '.join(tasks.TASKS)}"))
    return value


def _check_attention(value: str) -> str:
    if value not in ATTENTION:
        _fail(ValueError(f"--attn {value}: unknown attention; choose from {', '.join(ATTENTION)}"))
    return value


def _check_source(task: str, source: Optional[Path]) -> None:
    """A local --source must exist (its layout is read when the data is prepared); hf:REPO and tfds:NAME are looked
    up then too."""
    import tasks

    if source is not None and not str(source).startswith(("hf:", "tfds:")) and not source.expanduser().exists():
        _fail(ValueError(f"--source {source}: does not exist; {' '.join(tasks.TASKS[task].LAYOUTS.split())}"))


def _data_options(task: str, items: list[str], protocol_options: Optional[dict] = None) -> dict:
    """--data-option items read and checked against the task's options (tasks.data_options), before any data."""
    import tasks

    options = {**(protocol_options or {}), **parse_options(items, "--data-option")}
    try:
        tasks.check_data_options(task, options)
    except ValueError as e:
        _fail(ValueError(f"--data-option {' '.join(items)}: {e}"))
    return options


def _attention_options(task: str, attn: str, items: list[str]) -> dict:
    """-o/--option items read and checked against the attention's options; a data option of the task is pointed to
    --data-option."""
    import tasks

    options = parse_options(items, "--option")
    valid = attention_options(attn)
    data = tasks.data_options(task)
    for key, value in options.items():
        if key in valid:
            continue
        hint = f"; did you mean --data-option {key}={value}?" if key in data else ""
        listed = ", ".join(f"{k}={v}" for k, v in valid.items()) or "none"
        _fail(ValueError(f"--option {key}={value}: unknown option of attention {attn} (its options: {listed}){hint}"))
    return options


def _check_attention_values(model_cfg: Any, items: list[str], flag: str = "--option") -> None:
    """Build one attention layer of the run (a few small tensors): its constructor checks the option values."""
    from lra_soft.attention import build_attention

    try:
        build_attention(model_cfg.attention, model_cfg.dim, model_cfg.heads, max_len=model_cfg.max_len,
                        dropout=model_cfg.dropout, **model_cfg.attention_options)
    except (ValueError, TypeError) as e:
        _fail(ValueError(f"{flag} {' '.join(items)}: {e}" if items else str(e)))


def _task_defaults() -> str:
    """The train epilog: each task's defaults under each protocol, read from the task modules and lra_soft.protocol."""
    import tasks

    from lra_soft import protocol as P

    head = ("task", "steps", "batch", "lr", "warmup", "eval-every", "max-len", "pad-to paper / clean")
    rows = [head]
    for name, m in tasks.TASKS.items():
        pad = [P.apply(P.PROTOCOLS[p][name], m.MODEL, m.TRAIN)[1].pad_to for p in ("paper", "clean")]
        t = m.TRAIN
        rows.append((name, t.steps, t.batch_size, t.lr, t.warmup, t.eval_every, m.MODEL.max_len,
                     f"{pad[0]} / {pad[1]}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(f"{v!s:<{w}}" for v, w in zip(r, widths)).rstrip() for r in rows]
    return ("Task defaults, which the flags above override (max-len: the prepared data's at the default data options; "
            "pad-to 0: the longest sequence of each batch):\n\n\b\n" + "\n".join(lines))


def _check_device(value: str) -> str:
    """Fail at parse time, before any data is read, for a device this machine cannot give."""
    from lra_soft.distributed import resolve_device

    try:
        resolve_device(value)
    except ValueError as e:
        _fail(e)
    return value


# cuda:N makes this an open set, so the resolver checks it rather than a list of choices.
Device = Annotated[str, typer.Option(help=f"{DEVICES}.", callback=_check_device)]


@app.command()
def attentions() -> None:
    """List the registered attentions: cost in the sequence length n, summary, and -o options with their defaults."""
    for name, cls in ATTENTION.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        options = ", ".join(f"{k}={v}" for k, v in attention_options(name).items()) or "none"
        typer.echo(f"{name:<10} {COST[name]:<40} {doc}\n{'':<10} options: {options}")


@app.command("newton-residual")
def newton_residual(
    iters: Annotated[str, typer.Option(help="Comma-separated iteration counts.")] = "10,20,30",
    landmarks: Annotated[str, typer.Option(help="Comma-separated m (landmark counts).")] = "16,64,256,512",
    head_dim: Annotated[int, typer.Option(help="Head dim d of the random tokens.")] = 32,
    seed: int = 0,
) -> None:
    """Residual ||A A_k A - A||_2 / ||A||_2 of SOFT's Newton inverse (paper Fig. 4) for both initialisations."""
    from lra_soft.attention.diagnostics import residual_table

    its = [int(k) for k in iters.split(",")]
    rows = residual_table([int(m) for m in landmarks.split(",")], its, d=head_dim, seed=seed)
    typer.echo("| m | init | cond(A) | " + " | ".join(f"{k} iters" for k in its) + " |")
    typer.echo("|---|---|---|" + "---|" * len(its))
    for r in rows:
        typer.echo(f"| {r['m']} | {r['init']} | {r['cond']:.3g} | "
                   + " | ".join(f"{r[f'iters={k}']:.2e}" for k in its) + " |")


def _source_layouts() -> str:
    import tasks

    return "Accepted --source layouts:\n\n" + "\n\n".join(" ".join(m.LAYOUTS.split()) for m in tasks.TASKS.values())


@app.command(epilog=_source_layouts())
def prepare(
    task: Annotated[str, typer.Argument(help="LRA task: listops, text, retrieval, image or pathfinder.",
                                        callback=_check_task)],
    source: Annotated[Optional[Path], typer.Option(help="Raw data in a layout below; text/image also hf:REPO or "
                                                        "tfds:NAME. ListOps without it: generated.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Cache root; the cache is DATA_DIR/TASK.")] = Path("data/cache"),
    data_option: Annotated[list[str], typer.Option(help="Task data option key=value (repeatable; the options of each "
                                                        "task below).")] = [],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Read one task's raw data, tokenize it and cache arrays + manifest.json (reused while source and options match)."""
    import tasks
    from tasks._common import disk_bytes

    _check_source(task, source)
    try:
        options = _data_options(task, data_option)
        cache = tasks.prepare(task, source, data_dir, progress=progress, **options)
    except (ValueError, FileNotFoundError, DiskFull, Busy) as e:  # tasks.DataError is a ValueError
        _fail(e)
    except KeyboardInterrupt as e:  # a cache being built is removed on the way out
        _stopped(e)
    m = tasks.manifest(cache)
    typer.echo(f"{task}: {cache} counts {m['counts']} vocab_size {m['vocab_size']} max_len {m['max_len']}")
    size, raw = disk_bytes(cache), disk_bytes(cache / "raw") if (cache / "raw").is_dir() else 0
    typer.echo(f"on disk: {_size(size)}" + (f", of which {_size(raw)} are the raw files in {cache / 'raw'}, which "
                                           "the prepared cache no longer needs" if raw else ""))
    if m.get("skipped_empty"):
        typer.echo(f"skipped {m['skipped_empty']} empty image(s), listed in {cache / 'manifest.json'}")


@app.command("tasks")
def tasks_() -> None:
    """List the LRA tasks, one line each."""
    import tasks

    for name, module in tasks.TASKS.items():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<11} {doc}")


@app.command(epilog=_task_defaults())
def train(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="LRA task (see `tasks`).", callback=_check_task)],
    attn: Annotated[str, typer.Option(help="Attention (see `attentions`).", callback=_check_attention)] = "soft",
    option: Annotated[list[str], typer.Option("--option", "-o", help="Attention option key=value (repeatable; see "
                                                                      "`attentions`).")] = [],
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (task default, below).", callback=AT_LEAST_1)
                     ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (task default, below).",
                                                      callback=AT_LEAST_1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (task default, below).",
                                                callback=POSITIVE)] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Model length; longer inputs are cut (0 = data's, below).",
                                                   callback=AT_LEAST_0)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between dev evaluations (task default, below).",
                                                      callback=AT_LEAST_1)] = None,
    eval_batches: Annotated[Optional[int], typer.Option(help="Dev batches per evaluation (0 = all).",
                                                        callback=AT_LEAST_0)] = None,
    pad_to: Annotated[Optional[int], typer.Option(help="Pad batches to this length (0 = longest; protocol's, below).",
                                                  callback=AT_LEAST_0)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps (task default, below).", callback=AT_LEAST_0)
                      ] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout (task default: 0.1).", callback=FRACTION)] = None,
    pooling: Annotated[Optional[Pooling], typer.Option(help="Pooling; mean_padded divides by the padded length "
                                                           "(protocol's).")] = None,
    protocol: Annotated[ProtocolName, typer.Option(help="paper: the Table 6 harness, exactly; clean: our fixes; see "
                                                        "docs/protocols.md.")] = "paper",
    precision: Annotated[Optional[Precision], typer.Option(help="CUDA autocast, fp16 with a GradScaler (protocol's: "
                                                                "paper fp16, clean bf16); CPU runs fp32.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and dropout.")] = 0,
    device: Device = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Run directory [runs/TASK-ATTN[-OPTIONS]-PROTOCOL-seedN].")] = None,
    source: Annotated[Optional[Path], typer.Option(help="Raw data (see README, Data); ListOps: generated.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Cache directory of prepared data.")] = Path("data/cache"),
    data_option: Annotated[list[str], typer.Option(help="Task data option key=value (repeatable).")] = [],
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the 2-layer LRA encoder; select on dev; test the best checkpoint on the full test split."""
    import tasks

    from lra_soft import distributed as D
    from lra_soft import protocol as P
    from lra_soft.checkpoint import CheckpointError
    from lra_soft.train import TrainingDiverged, fit, resolve_configs

    run_dir = None
    try:
        module = tasks.get_task(task)
        proto = P.get_protocol(protocol, task)
        _check_source(task, source)
        options = _attention_options(task, attn, option)
        data_options = _data_options(task, data_option, proto.data_options)
        max_len = max_len or None
        overrides = dict(attention=attn, attention_options=options, pooling=pooling, dropout=dropout, steps=steps,
                         batch_size=batch_size, lr=lr, eval_every=eval_every, eval_batches=eval_batches,
                         pad_to=pad_to, warmup=warmup, seed=seed, precision=precision)
        # The options alone, before any data is touched: errors and the comparability line come first.
        model_cfg, train_cfg = resolve_configs(module.MODEL, module.TRAIN, protocol=proto, max_len=max_len,
                                               **overrides)
        _check_attention_values(model_cfg, option)
        info = D.init_distributed(device)
        diffs = P.differences(task, model_cfg, train_cfg, task_model=module.MODEL, task_train=module.TRAIN,
                              device=info.device.type)
        if D.is_main():
            typer.echo(P.verdict(protocol, task, attn, diffs, data_checked=False))
        data, manifest = _task_data(task, source, data_dir, data_options, progress)
        model_cfg, train_cfg = resolve_configs(
            module.MODEL, module.TRAIN, protocol=proto, max_len=max_len or manifest.get("max_len"),
            vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"], **overrides)
        data_diffs = P.differences(task, model_cfg, train_cfg, task_model=module.MODEL, task_train=module.TRAIN,
                                   device=info.device.type, counts=manifest.get("counts"),
                                   data_options=manifest.get("options"))
        if D.is_main() and data_diffs != diffs:
            typer.echo(P.verdict(protocol, task, attn, data_diffs, data_checked=True))
        tag = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        run_dir = out or Path("runs") / f"{task}-{attn}{tag}-{protocol}-seed{seed}"
        results = fit(task, model_cfg, train_cfg, data, run_dir, device=device, resume=resume, progress=progress,
                      differences=data_diffs)
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError, TrainingDiverged, *RUN_ERRORS) as e:
        D.cleanup()
        _fail(e)
    except KeyboardInterrupt as e:
        D.cleanup()
        _stopped(e, ctx, run_dir)
    if D.is_main():
        typer.echo(f"{task}/{attn}: test accuracy {100 * results['test_acc']:.2f}% on {results['test_examples']} "
                   f"examples (best dev {100 * results['best_val_acc']:.2f}% at step {results['best_step']}); "
                   f"run directory {run_dir}")
    D.cleanup()


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Argument(help="LRA task the checkpoint was trained on.", callback=_check_task)],
    checkpoint: Annotated[Path, typer.Option(help="best.pt or last.pt of a run.")],
    split: Annotated[Split, typer.Option(help="Split to evaluate.")] = "test",
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: the run's).", callback=AT_LEAST_1)
                          ] = None,
    device: Device = "auto",
    source: Annotated[Optional[Path], typer.Option(help="Raw data, as for train.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Cache directory of prepared data.")] = Path("data/cache"),
    data_option: Annotated[list[str], typer.Option(help="Task data option key=value (repeatable).")] = [],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Accuracy of a checkpoint on the whole val or test split."""
    from lra_soft import distributed as D
    from lra_soft.checkpoint import CheckpointError, load_checkpoint
    from lra_soft.train import collate_fn, evaluate, model_from_checkpoint

    _check_source(task, source)
    try:
        info = D.init_distributed(device)
        state = load_checkpoint(checkpoint, required=("model", "config", "vocab"))
        if state["config"]["task"] != task:
            raise ValueError(f"{checkpoint} was trained on {state['config']['task']!r}, not {task!r}")
        data, _ = _task_data(task, source, data_dir, _data_options(task, data_option), progress)
        if list(state["vocab"]) != data.vocab:
            raise ValueError(f"the vocabulary of {checkpoint} differs from the prepared data's; the ids would not "
                             "mean the same tokens. Prepare the data the run was trained on")
        model, cfg = model_from_checkpoint(state)
        train_cfg = cfg["train"]
        collate = collate_fn(data.collate, train_cfg["pad_to"], cfg["model"]["max_len"])
        metrics = evaluate(model.to(info.device), getattr(data, split), collate, device=info.device,
                           batch_size=batch_size or train_cfg["batch_size"],
                           precision=train_cfg.get("precision", "bf16"),
                           progress=f"evaluating {checkpoint.name} on {split}" if progress else "")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        D.cleanup()
        _fail(e)
    if D.is_main():
        typer.echo(f"{task} {split}: accuracy {100 * metrics['acc']:.2f}% on {metrics['count']} examples "
                   f"(loss {metrics['loss']:.4f}); checkpoint {checkpoint} (step {state.get('step')})")
    D.cleanup()


@app.command("eval-all")
def eval_all(
    runs: Annotated[Path, typer.Option(help="Directory searched for run directories (results.json).")] = Path("runs"),
    out: Annotated[Optional[Path], typer.Option(help="Where eval_all.{md,json,csv,png} go (default: --runs).")
                   ] = None,
) -> None:
    """Runs grouped by experiment (mean, std, n over seeds): comparable ones beside the paper's Table 6, the rest
    in a second table with their differences; a plot of accuracy per task and attention with error bars."""
    from lra_soft import results as R

    try:
        found = R.find_runs(runs)
    except (FileNotFoundError, ValueError) as e:
        _fail(e)
    if not found:
        _fail(FileNotFoundError(f"no results.json under {runs}; train first (`cli.py train listops --attn soft`)"))
    rows = R.summarize(found)
    typer.echo(R.markdown(rows))
    typer.echo("\nwritten: " + ", ".join(str(p) for p in R.save(rows, out or runs)))


GRID_EPILOG = """Examples:

\b
  python cli.py grid --dry-run                          # the full Table 6 grid: 4 tasks x 6 attentions x 3 seeds
  python cli.py grid                                    # run it here (one run per GPU when several are visible)
  python cli.py grid --launcher slurm --slurm-partition gpu --timeout-min 1440
  python cli.py grid --status                           # the state of every run
  python cli.py grid --task listops --attn soft --attn soft:num_landmarks=64 --attn softmax --seeds 0-4

Re-running the same command skips finished runs, resumes interrupted ones and retries failed ones."""


@app.command(epilog=GRID_EPILOG)
def grid(
    task: Annotated[list[str], typer.Option(help="LRA task (repeatable) [Table 6's: listops, text, retrieval, "
                                                 "image].")] = [],
    attn: Annotated[list[str], typer.Option(help="Attention NAME or NAME:key=value,... (repeatable) [Table 6's six: "
                                                 "softmax, soft, nystrom, linformer, performer, reformer].")] = [],
    option: Annotated[list[str], typer.Option("--option", "-o", help="key=value for every chosen attention that "
                                                                      "takes it (repeatable).")] = [],
    seeds: Annotated[str, typer.Option(help="Seeds: 0,1,2 or 0-4.")] = "0,1,2",
    protocol: Annotated[ProtocolName, typer.Option(help="Every run's --protocol (see docs/protocols.md).")
                        ] = "paper",
    runs: Annotated[Path, typer.Option(help="Root of the run directories RUNS/TASK/ATTENTION/seedN and of the "
                                            "table grid.{md,json,csv,png}.")] = Path("runs/grid"),
    launcher: Annotated[Literal["local", "slurm"], typer.Option(help="local: on this machine; slurm: one submitit "
                                                                     "job per run.")] = "local",
    gpus_per_job: Annotated[int, typer.Option(help="GPUs of each run (torchrun inside the job when > 1).",
                                              callback=AT_LEAST_1)] = 1,
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm partition.")] = None,
    timeout_min: Annotated[int, typer.Option(help="Slurm time limit of a job in minutes; a job that reaches it "
                                                  "is requeued and resumes.", callback=AT_LEAST_1)] = 4320,
    cpus_per_task: Annotated[Optional[int], typer.Option(help="CPUs of a Slurm job [8 per GPU].",
                                                         callback=AT_LEAST_1)] = None,
    slurm_option: Annotated[list[str], typer.Option(help="Further submitit Slurm parameter key=value, e.g. "
                                                         "account=NAME, qos=NAME (repeatable).")] = [],
    submitit_cluster: Annotated[Literal["slurm", "local", "debug"], typer.Option(
        hidden=True, help="submitit's executor: local and debug run the Slurm jobs on this machine.")] = "slurm",
    wait: Annotated[bool, typer.Option(help="slurm: wait for the jobs, then print the table.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show each run's state and stop.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan with each run's estimated cost and "
                                                            "stop.")] = False,
    measure: Annotated[bool, typer.Option(help="--dry-run: time one training step of each task x attention here.")
                       ] = True,
    max_runs: Annotated[int, typer.Option(help="local: start at most this many runs this time (0 = all).",
                                          callback=AT_LEAST_0)] = 0,
    source: Annotated[list[str], typer.Option(help="TASK=PATH: raw data of a task, as train's --source "
                                                   "(repeatable).")] = [],
    data_dir: Annotated[Path, typer.Option(help="Cache directory of prepared data.")] = Path("data/cache"),
    data_option: Annotated[list[str], typer.Option(help="TASK:key=value: a task's data option (repeatable).")] = [],
    steps: Annotated[Optional[int], typer.Option(help="Every run's --steps (task default).", callback=AT_LEAST_1)
                     ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Every run's --batch-size.", callback=AT_LEAST_1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Every run's --lr.", callback=POSITIVE)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Every run's --warmup.", callback=AT_LEAST_0)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Every run's --eval-every.", callback=AT_LEAST_1)] = None,
    eval_batches: Annotated[Optional[int], typer.Option(help="Every run's --eval-batches.", callback=AT_LEAST_0)
                            ] = None,
    pad_to: Annotated[Optional[int], typer.Option(help="Every run's --pad-to.", callback=AT_LEAST_0)] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Every run's --max-len.", callback=AT_LEAST_1)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Every run's --dropout.", callback=FRACTION)] = None,
    pooling: Annotated[Optional[Pooling], typer.Option(help="Every run's --pooling.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="Every run's --precision.")] = None,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars while preparing data.")] = True,
) -> None:
    """The LRA table: one train run per task x attention x seed in RUNS/TASK/ATTENTION/seedN, each in its own
    process; finished runs are skipped, interrupted ones resumed; then mean, std and n per cell beside Table 6."""
    import tasks

    from lra_soft import grid as G
    from lra_soft import protocol as P
    from lra_soft import results as R
    from lra_soft.bench.specs import parse_specs

    try:
        names = [_check_task(t) for t in task] or list(P.TABLE6_TASKS)
        specs = parse_specs(attn or list(P.TABLE6_ATTENTIONS), option)
        sources = {t: v[-1] for t, v in G.per_task(source, "--source", "=", names).items()}
        for t, src in sources.items():
            _check_source(t, Path(src))
        data_options = {}
        for t, items in G.per_task(data_option, "--data-option", ":", names).items():
            _data_options(t, items, P.get_protocol(protocol, t).data_options)  # checked with the protocol's
            data_options[t] = parse_options(items, "--data-option")
        train = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, eval_every=eval_every,
                     eval_batches=eval_batches, pad_to=pad_to, max_len=max_len, dropout=dropout, pooling=pooling,
                     precision=precision)
        cfg = G.GridConfig(tasks=tuple(names), attentions=tuple(specs), seeds=G.parse_seeds(seeds),
                           protocol=protocol, runs=runs, data_dir=data_dir, sources=sources,
                           data_options=data_options, train={k: v for k, v in train.items() if v is not None},
                           device=device)
        for t in names:
            for spec in specs:
                _check_attention_values(G.resolve(cfg, t, spec)[0], [spec.label], flag=f"--attn (task {t})")
        plan = G.make_plan(cfg)
        if status:
            typer.echo(G.status_table(G.states(plan)))
            return
        if dry_run:
            typer.echo(G.dry_run(cfg, plan, gpus_per_job=gpus_per_job, measure=measure,
                                 log=lambda line: typer.echo(line, err=True)))
            return
        G.check_conflicts(G.states(plan))
        executor = None
        if launcher == "slurm":
            executor = G.slurm_executor(runs / ".submitit" / "%j", cluster=submitit_cluster,
                                        partition=slurm_partition, timeout_min=timeout_min,
                                        gpus_per_job=gpus_per_job, cpus_per_task=cpus_per_task,
                                        options=parse_options(slurm_option, "--slurm-option"))
        elif not device.startswith("cuda:"):
            G.gpu_slots(G.visible_gpus(), gpus_per_job)  # enough GPUs, before any data
        G.prepare_data(cfg, progress=progress, log=typer.echo)
    except (ValueError, FileNotFoundError, tasks.DataError) as e:
        _fail(e)
    if executor is None:
        # --device cuda:N pins every run to that GPU: then runs go one after another, devices left as they are.
        final = G.launch_local(plan, gpus_per_job=gpus_per_job, log=typer.echo, limit=max_runs,
                               gpus=[] if device.startswith("cuda:") else None)
    else:
        jobs = G.launch_slurm(plan, executor, gpus_per_job=gpus_per_job, root=runs, log=typer.echo)
        if not wait:
            typer.echo(f"{len(jobs)} job(s) submitted; `--status` with the same arguments shows every run's state; "
                       f"the last job to end writes the table to {runs / (G.TABLE_STEM + '.md')}")
            return
        for _, job in jobs:
            job.result()
        final = G.states(plan)
    rows, paths = G.table(plan, runs)
    if rows:
        typer.echo("\n" + R.markdown(rows) + "\n\nwritten: " + ", ".join(str(p) for p in paths))
    left = [s for s in final if s.state != "done"]
    for s in left:
        typer.echo(f"{s.run.name}: {G.describe(s)}", err=True)
    failed = sum(s.state == "failed" for s in left)
    if failed:
        _fail(RuntimeError(f"{failed} of {len(plan)} runs failed (logs above); fix the cause and run the same "
                           "command again: finished runs are kept, the failed ones are tried again"))


def _command_line(ctx: typer.Context) -> str:
    """The command as a user would retype it: every parameter given on the command line, in declaration order."""
    import shlex

    names, c = [], ctx
    while c.parent is not None:  # the (sub)command names, whatever the program was called (cli.py, -m cli)
        names.insert(0, c.info_name)
        c = c.parent
    words = ["python", "cli.py", *names]
    for param in ctx.command.params:
        # Compared by name: typer may vendor its own click, whose ParameterSource is another enum class.
        if getattr(ctx.get_parameter_source(param.name), "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False) and param.secondary_opts:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                words += [param.opts[0], str(v)]
    return " ".join(shlex.quote(w) for w in words)


@app.command()
def bench(
    ctx: typer.Context,
    attn: Annotated[list[str], typer.Option(help="Attention NAME or NAME:key=value,... (repeatable) [soft, softmax].")
                    ] = [],
    option: Annotated[list[str], typer.Option("--option", "-o", help="key=value for every chosen attention that "
                                                                      "takes it (repeatable).")] = [],
    lengths: Annotated[Optional[str], typer.Option(help="Comma-separated n; imagenet: image sizes "
                                                        "[1024,2048,4096; lra 2048; imagenet 224].")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size [8; lra 32; imagenet 8].", callback=AT_LEAST_1)
                     ] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads [2; fig1b 12].", callback=AT_LEAST_1)] = None,
    head_dim: Annotated[int, typer.Option(help="Head dimension (model width = heads x head_dim).",
                                          callback=AT_LEAST_1)] = 32,
    dtype: Annotated[DType, typer.Option(help="Dtype of inputs and parameters.")] = "float32",
    autocast: Annotated[Autocast, typer.Option(help="torch.autocast dtype (GPU mixed precision).")] = "none",
    device: Device = "auto",
    mask: Annotated[bool, typer.Option(help="Pass a padding mask (lengths n down to about n/2).")] = False,
    warmup: Annotated[int, typer.Option(help="Untimed calls per case.", callback=AT_LEAST_0)] = 2,
    repeats: Annotated[int, typer.Option(help="Timed calls per case (median and quartiles reported).",
                                         callback=AT_LEAST_1)] = 5,
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile'd attentions/models.")] = False,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend.")] = "inductor",
    memory: Annotated[bool, typer.Option(help="Measure peak memory.")] = True,
    flops: Annotated[bool, typer.Option(help="Count forward+backward FLOPs (attention mode).")] = True,
    floors: Annotated[bool, typer.Option(help="Measure the matmul rate and SOFT's Newton-product floor.")] = True,
    matmul_size: Annotated[int, typer.Option(help="Side of the square matmul that measures the machine's rate "
                                                  "[0: 2048 on CPU, 8192 on GPU].", callback=AT_LEAST_0)] = 0,
    model: Annotated[BenchModel, typer.Option(help="none: the attention module; lra: the encoder, tokens/s; "
                                                   "imagenet: backbones, images/s.")] = "none",
    depth: Annotated[Optional[int], typer.Option(help="lra: encoder layers [2; fig1b 12].", callback=AT_LEAST_1)
                     ] = None,
    mlp_dim: Annotated[Optional[int], typer.Option(help="lra: feed-forward width [2 x width].", callback=AT_LEAST_1)
                       ] = None,
    variant: Annotated[list[str], typer.Option(help="imagenet: backbone (repeatable) [soft_tiny].")] = [],
    preset: Annotated[Optional[Literal["fig1b"]], typer.Option(help="fig1b: the paper's Figure 1b protocol (12 "
                                                                    "layers, d 384, h 12, m 49, batch 1, n = 784 p); "
                                                                    "flags above override.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for NAME.{json,csv,md,png}.")] = Path("runs/bench"),
    name: Annotated[str, typer.Option(help="File stem of the outputs.")] = "bench",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Time, peak memory and FLOPs of attentions (or whole models) against sequence length; table, JSON, CSV, plot."""
    import sys

    from tqdm import tqdm

    from lra_soft import bench as B

    try:
        if preset:
            model = "lra"
            attn = attn or [a for a in B.FIG1B_ATTENTIONS if a.split(":")[0] in ATTENTION]
        heads = heads or (B.FIG1B.heads if preset else 2)
        depth = depth or (B.FIG1B.depth if preset else 2)
        specs = B.parse_specs(attn or ["soft", "softmax"], option) if model != "imagenet" else []
        wrap = (lambda it: tqdm(it, desc="bench", unit="length", leave=False)) if progress else iter
        log = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else (lambda s: None)
        if model == "none":
            cfg = B.AttentionBenchConfig(
                lengths=B.parse_lengths(lengths or "1024,2048,4096"), batch=batch or 8, heads=heads,
                head_dim=head_dim, dtype=dtype, autocast=autocast, device=device, mask=mask, warmup=warmup,
                repeats=repeats, compile=compile, compile_backend=compile_backend, memory=memory, flops=flops,
                floors=floors, matmul_size=matmul_size)
            result = B.run_attention_bench(specs, cfg, log=log, progress=wrap)
        else:
            base = B.FIG1B if preset else B.ModelBenchConfig()
            default_lengths = ",".join(map(str, base.lengths)) if preset or model == "lra" else "224"
            width = heads * head_dim
            cfg = B.ModelBenchConfig(
                model=model, lengths=B.parse_lengths(lengths or default_lengths),
                batch=batch or (base.batch if model == "lra" else 8), dim=width, depth=depth, heads=heads,
                mlp_dim=mlp_dim or (base.mlp_dim if preset else 2 * width), dropout=base.dropout,
                variants=tuple(variant) or ("soft_tiny",), dtype=dtype, autocast=autocast, device=device,
                mask=mask, warmup=max(warmup, 1), repeats=repeats, memory=memory, compile=compile,
                compile_backend=compile_backend)
            result = B.run_model_bench(specs, cfg, log=log, progress=wrap)
        result["environment"] = B.environment()
        command = _command_line(ctx)
        result["command"] = command
        paths = B.save(result, out, name, command=command)
    except ValueError as e:
        _fail(e)
    typer.echo(B.markdown_table(result))
    typer.echo("written: " + ", ".join(str(p) for p in paths))


imagenet_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="SOFT ImageNet backbones (paper Table 2): summary, train, eval.")
app.add_typer(imagenet_app, name="imagenet")


@imagenet_app.command("summary")
def imagenet_summary(
    model: Annotated[list[str], typer.Option(help="Backbone (repeatable) [all five].")] = [],
    img_size: Annotated[int, typer.Option(help="Square input side for FLOPs and m.", callback=AT_LEAST_1)] = 224,
) -> None:
    """Parameters, FLOPs (torch.utils.flop_counter; GMACs beside the paper's G) and m per stage of the variants."""
    from lra_soft.vision import PRESETS
    from lra_soft.vision.profile import summary_table

    unknown = [m for m in model if m not in PRESETS]
    if unknown:
        _fail(ValueError(f"--model {' '.join(unknown)}: unknown backbone; choose from {', '.join(PRESETS)}"))
    smallest = max(PRESETS[m].min_img_size for m in model or PRESETS)
    if img_size < smallest:
        _fail(ValueError(f"--img-size {img_size}: must be >= {smallest} (every SOFT stage needs one landmark window)"))
    typer.echo(summary_table(model or None, (img_size, img_size)))
    typer.echo("GMACs = multiply-accumulates (the paper's 'FLOPs' convention) = GFLOPs / 2; dense = Linear + Conv2d; "
               "attn = kernels, P^T A^+ (P V), stage-4 softmax and the Newton iterations (newton)")


RECIPE = ImageNetConfig()  # the paper's recipe: every default of `imagenet train`


@imagenet_app.command("train")
def imagenet_train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="ImageFolder root holding train/<class>/* and val/<class>/*.")],
    model: Annotated[Backbone, typer.Option(help="Backbone.")] = RECIPE.model,
    recipe: Annotated[Literal["paper", "authors"], typer.Option(
        help="paper: Section 4.1 (the defaults shown). authors: + RandAugment rand-m9-mstd0.5-inc1, random erasing "
             "0.25, colour jitter 0.4, random interpolation (through timm: pip install 'lra-soft[timm]'), "
             "min-lr 5e-5, clip-grad 1.0, EMA 0.99996, eval crop 0.9, lr per model; flags given still win.")
    ] = RECIPE.recipe,
    out: Annotated[Path, typer.Option(help="Run directory (config.json, metrics.jsonl, last.pt, best.pt, results.json).")
                   ] = Path("runs/imagenet"),
    epochs: Annotated[int, typer.Option(help="Epochs.", callback=AT_LEAST_1)] = RECIPE.epochs,
    warmup_epochs: Annotated[int, typer.Option(help="Linear warm-up epochs.", callback=AT_LEAST_0)
                             ] = RECIPE.warmup_epochs,
    global_batch: Annotated[int, typer.Option(help="Batch over all processes.", callback=AT_LEAST_1)
                            ] = RECIPE.global_batch,
    micro_batch: Annotated[int, typer.Option(help="Per-process forward batch, 0 = global/world (else accumulate).",
                                             callback=AT_LEAST_0)] = RECIPE.micro_batch,
    lr: Annotated[float, typer.Option(help="Peak lr at batch 1024 (scaled by global-batch/1024).", callback=POSITIVE)
                  ] = RECIPE.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", callback=AT_LEAST_0)] = RECIPE.weight_decay,
    img_size: Annotated[int, typer.Option(help="Training crop side (evaluation: resize /crop_pct, centre crop).",
                                          callback=AT_LEAST_1)] = RECIPE.img_size,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.", callback=FRACTION)
                               ] = RECIPE.label_smoothing,
    mixup: Annotated[float, typer.Option(help="Mixup alpha, 0 = off.", callback=AT_LEAST_0)] = RECIPE.mixup,
    cutmix: Annotated[float, typer.Option(help="CutMix alpha, 0 = off.", callback=AT_LEAST_0)] = RECIPE.cutmix,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth rate.", callback=FRACTION)] = RECIPE.drop_path,
    clip_grad: Annotated[float, typer.Option(help="Max gradient norm, 0 = none.", callback=AT_LEAST_0)
                         ] = RECIPE.clip_grad,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the weights, 0 = no EMA (authors: 0.99996).",
                                             callback=FRACTION)] = RECIPE.ema_decay,
    option: Annotated[list[str], typer.Option("--option", "-o", help="VisionConfig field key=value (repeatable), "
                                              "e.g. landmarks=avgpool, norm=pre, v_conv=(0,0,0).")] = [],
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = RECIPE.amp,
    workers: Annotated[int, typer.Option(help="DataLoader workers per process.", callback=AT_LEAST_0)
                       ] = RECIPE.workers,
    seed: Annotated[int, typer.Option(help="Seed.")] = RECIPE.seed,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps, 0 = full schedule.",
                                           callback=AT_LEAST_0)] = RECIPE.max_steps,
    device: Device = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
) -> None:
    """Train a SOFT backbone with the paper's recipe or the authors' (--recipe); DDP with `torchrun --nproc_per_node N
    cli.py imagenet train`."""
    from lra_soft import distributed as D
    from lra_soft.checkpoint import CheckpointError
    from lra_soft.engine import TrainingDiverged
    from lra_soft.imagenet import train
    from lra_soft.imagenet.recipes import get_recipe
    from lra_soft.vision import preset

    try:
        overrides = parse_options(option, "--option")
        # The backbone's config alone (no model, no data): a wrong field or value, or a crop too small, fails here.
        for flag, extra in ((f"--option {' '.join(option)}", {}), (f"--img-size {img_size}", {"img_size": img_size})):
            try:
                preset(model, **overrides, **extra)
            except (ValueError, TypeError) as e:
                _fail(ValueError(f"{flag}: {e}"))
        flags = dict(model=model, img_size=img_size, epochs=epochs, warmup_epochs=warmup_epochs,
                     global_batch=global_batch, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay,
                     label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, drop_path=drop_path,
                     clip_grad=clip_grad, ema_decay=ema_decay, amp=amp, workers=workers, seed=seed,
                     max_steps=max_steps)
        # the recipe's values replace the defaults of the flags it sets, not a value given on the command line
        sets = get_recipe(recipe).defaults(model)
        given = {k: v for k, v in flags.items()
                 if getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE" or k not in sets}
        cfg = ImageNetConfig.for_recipe(recipe, **given)
        metrics = train(cfg, data, out, device=device, resume=resume, **overrides)
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError, TrainingDiverged, *RUN_ERRORS) as e:
        D.cleanup()
        _fail(e)
    except KeyboardInterrupt as e:
        D.cleanup()
        _stopped(e, ctx, out)
    if D.is_main():
        typer.echo(f"{model}: step {metrics['step']}, val top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%"
                   f" on {metrics['images']} images; run directory {out}")
    D.cleanup()


@imagenet_app.command("eval")
def imagenet_eval(
    checkpoint: Annotated[Path, typer.Argument(help="last.pt or best.pt of `imagenet train`.")],
    data: Annotated[Path, typer.Option(help="ImageFolder root; evaluates DATA/SPLIT.")],
    split: Annotated[str, typer.Option(help="Sub-directory of --data.")] = "val",
    batch_size: Annotated[int, typer.Option(help="Per-process batch.", callback=AT_LEAST_1)] = 64,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights when the checkpoint has them.")] = True,
    workers: Annotated[int, typer.Option(help="DataLoader workers.", callback=AT_LEAST_0)] = 4,
    device: Device = "auto",
) -> None:
    """Top-1 / top-5 of a checkpoint (resize to img_size / its crop_pct, centre crop), summed over DDP processes."""
    from lra_soft import distributed as D
    from lra_soft.checkpoint import CheckpointError
    from lra_soft.imagenet import evaluate_checkpoint

    try:
        m = evaluate_checkpoint(checkpoint, data, split=split, batch_size=batch_size, use_ema=ema, device=device,
                                workers=workers)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        D.cleanup()
        _fail(e)
    if D.is_main():
        typer.echo(f"{split}: top-1 {m['top1']:.2f}% top-5 {m['top5']:.2f}% loss {m['loss']:.4f} on {m['images']} "
                   f"images ({m['weights']} weights of {checkpoint})")
    D.cleanup()


if __name__ == "__main__":
    app()
