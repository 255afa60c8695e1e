"""The training engine (``lra_soft.engine``) on a toy recipe: one step over micro-batches equals one full batch,
micro-batches are drawn lazily, a diverged step changes nothing, run directories refuse or resume, and a stopped run
resumed ends bit-identical to an uninterrupted one (with an EMA and gradient accumulation); a signal between two
evaluations writes last.pt there and its resume is bit-identical too; a run directory in use is refused."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lra_soft.checkpoint import CheckpointError, load_checkpoint
from lra_soft.engine import Loop, Recipe, RunDir, TrainingDiverged, _steps, fit, train_step
from lra_soft.interrupt import Interrupted
from lra_soft.locks import LOCK, Busy


def _loss(model, batch):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    return loss, torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64)])


def test_accumulated_step_equals_one_full_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    full, halves = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    halves.load_state_dict(full.state_dict())
    opt_a, opt_b = torch.optim.SGD(full.parameters(), lr=0.5), torch.optim.SGD(halves.parameters(), lr=0.5)
    train_step(full, opt_a, [(x, y)], _loss)
    stats = train_step(halves, opt_b, [(x[:4], y[:4]), (x[4:], y[4:])], _loss, accumulation=2)
    assert stats[1].item() == 2  # stats are summed over the micro-batches
    for a, b in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs 2 micro-batches, the data gave 1"):
        train_step(halves, opt_b, [(x, y)], _loss, accumulation=2)


def test_micro_batches_are_drawn_when_the_step_reaches_them():
    events = []

    def batches():
        for i in range(4):
            events.append(f"fetch {i}")
            yield i

    for group in _steps(batches(), 2):
        for i in group:
            events.append(f"use {i}")
    assert events == ["fetch 0", "use 0", "fetch 1", "use 1", "fetch 2", "use 2", "fetch 3", "use 3"]


def test_a_diverged_step_leaves_the_weights_untouched():
    model = nn.Linear(5, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def nan_loss(model, batch):
        loss, stats = _loss(model, batch)
        return loss * float("nan"), stats * float("nan")

    def check(stats):
        if not torch.isfinite(stats).all():
            raise TrainingDiverged("nan")

    with pytest.raises(TrainingDiverged):
        train_step(model, opt, [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))], nan_loss, on_stats=check)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Toy(Recipe):
    """Softmax regression on a fixed random set; batches depend on (seed, epoch, step) only; dropout uses the RNG."""

    def __init__(self, loop: Loop, nan_at: int = 0):
        self.loop, self.nan_at, self.calls = loop, nan_at, 0
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)

    def build_model(self):
        return nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 3))

    def optimizer(self, model):
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def micro_batches(self, epoch, start):
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(100 * self.loop.seed + epoch))
        per_step = 24 // self.loop.steps_per_epoch
        micro = per_step // self.loop.accumulation
        for i in range(start * per_step, 24, micro):
            yield self.x[perm[i:i + micro]], self.y[perm[i:i + micro]]

    def loss(self, model, batch):
        self.calls += 1
        loss, stats = _loss(model, batch)
        if self.nan_at and self.calls == self.nan_at:
            return loss * float("nan"), stats * float("nan")
        return loss, stats

    def record(self, step, stats, seconds, model, ema, optimizer, scheduler):
        model.eval()
        with torch.no_grad():
            acc = (model(self.x).argmax(-1) == self.y).double().mean().item()
        return {"step": step, "loss": (stats[0] / stats[1]).item(), "acc": acc}, acc

    def finish(self, model, ema, best, run):
        return {"best_acc": run["best_acc"], "steps": run["step"]}

    def config(self):
        return {"toy": 1, "steps": self.loop.steps}


LOOP = Loop(steps=6, steps_per_epoch=3, eval_every=2, seed=3, accumulation=2, ema_decay=0.5)


def test_fit_writes_the_run_and_resumes_bit_identically(tmp_path):
    fit(Toy(LOOP), tmp_path / "straight", device="cpu", progress=False)
    fit(Toy(replace(LOOP, stop_at=4)), tmp_path / "split", device="cpu", progress=False)  # stops mid-epoch
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        fit(Toy(LOOP), tmp_path / "split", device="cpu", progress=False)
    fit(Toy(LOOP), tmp_path / "split", device="cpu", progress=False, resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 6 and a["epoch"] == 2
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert [r["step"] for r in RunDir(tmp_path / "straight", resume=True).rows()] == [2, 4, 6]
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == rows
    steps = (tmp_path / "straight" / "steps.jsonl").read_text()
    assert [json.loads(line)["step"] for line in steps.splitlines()] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "split" / "steps.jsonl").read_text() == steps  # per-step losses too, after the resume
    assert {"config.json", "last.pt", "best.pt", "results.json"} <= {p.name for p in (tmp_path / "split").iterdir()}


def test_resume_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(Toy(LOOP), tmp_path / "none", device="cpu", progress=False, resume=True)
    fit(Toy(replace(LOOP, stop_at=2)), tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="another configuration"):
        fit(Toy(replace(LOOP, steps=8)), tmp_path / "run", device="cpu", progress=False, resume=True)


def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step 4; the run stopped and the last good checkpoint is .*"
                                               r" \(step 2\)"):
        fit(Toy(LOOP, nan_at=7), tmp_path / "run", device="cpu", progress=False)  # micro-batch 7 = step 4
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_long_cpu_run_says_so_once_with_a_cheaper_setting(tmp_path, capsys, monkeypatch):
    import lra_soft.engine as engine
    monkeypatch.setattr(engine, "LONG_RUN_S", 0.0)  # any run is "long"
    monkeypatch.setattr(Toy, "cheaper", lambda self: "cheaper: fewer steps")
    fit(Toy(LOOP), tmp_path / "run", device="cpu", progress=False)
    out = capsys.readouterr().out
    assert out.count("note: on this CPU the 2 steps left take about") == 1 and "cheaper: fewer steps" in out
    monkeypatch.setattr(engine, "LONG_RUN_S", 3600.0)
    fit(Toy(LOOP), tmp_path / "quick", device="cpu", progress=False)
    assert "note:" not in capsys.readouterr().out


def test_lra_recipe_suggests_the_cheaper_settings_of_the_paper_run():
    from types import SimpleNamespace

    from lra_soft.train import LRARecipe
    from tasks import listops
    data = SimpleNamespace(collate=lambda items, pad_to=0: items)
    hint = LRARecipe("listops", replace(listops.MODEL, attention="soft"), replace(listops.TRAIN, pad_to=2048),
                     data).cheaper()
    assert "-o num_landmarks=64" in hint and "--protocol clean" in hint and "--steps 500" in hint
    assert "not comparable" in hint


def test_a_last_pt_of_the_older_imagenet_loop_is_refused_by_name(tmp_path):
    from lra_soft.checkpoint import save_checkpoint
    run = tmp_path / "old"
    save_checkpoint(run / "last.pt", {"model": {}, "optimizer": {}, "schedule": {}, "rng": [], "step": 3,
                                      "config": {}})  # the layout before the shared engine
    with pytest.raises(CheckpointError, match="before its shared training engine .* 'schedule' key"):
        fit(Toy(LOOP), run, device="cpu", progress=False, resume=True)


# --------------------------------------------------------------------------------------------------- signals

class Signalled(Toy):
    """Toy that sends itself ``signals`` (real ones, through the OS) during micro-batch ``at``."""

    def __init__(self, loop, at, signals=(signal.SIGINT,)):
        super().__init__(loop)
        self.at, self.signals = at, signals

    def loss(self, model, batch):
        if self.calls + 1 == self.at:
            for s in self.signals:
                os.kill(os.getpid(), s)
        return super().loss(model, batch)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_evaluations_writes_last_pt_and_the_resume_is_bit_identical(tmp_path, signum):
    fit(Toy(LOOP), tmp_path / "straight", device="cpu", progress=False)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=rf"^stopped by {signal.Signals(signum).name} after step 3 of 6; .*last\.pt "
                                          "holds the run at that step$") as info:
        fit(Signalled(LOOP, at=5, signals=(signum,)), tmp_path / "split", device="cpu", progress=False)  # step 3
    assert info.value.exit_code == 128 + signum
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the handlers are put back
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["step"] == 3 and [r["step"] for r in state["step_rows"]] == [3]  # evaluations at 2 and 4
    assert not (tmp_path / "split" / "results.json").exists()
    fit(Toy(LOOP), tmp_path / "split", device="cpu", progress=False, resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    for name in ("metrics.jsonl", "steps.jsonl", "results.json"):  # the row at step 4 covers steps 3 and 4
        assert (tmp_path / "split" / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(Interrupted, match="stopped at once by a second SIGINT"):
        fit(Signalled(LOOP, at=5, signals=(signal.SIGINT, signal.SIGINT)), tmp_path / "run", device="cpu",
            progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


# --------------------------------------------------------------------------------------------------- run lock

def test_a_run_directory_another_process_trains_into_is_refused(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from filelock import FileLock\n"
                               "with FileLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()",
                               str(run / LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    try:
        with pytest.raises(Busy, match=r"^the run directory .*run is in use by another process \(it holds the lock "
                                       r".*\.lock\); another training writes into it; wait for it to end, or pass "
                                       r"another --out$"):
            fit(Toy(LOOP), run, device="cpu", progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (run / "config.json").exists()  # refused before anything was written
    fit(Toy(LOOP), run, device="cpu", progress=False)  # a killed holder's lock is free
    assert (run / "results.json").exists()


# --------------------------------------------------------------------------------------------------- DDP failures

# Run by two gloo processes under torchrun: each scenario makes one process fail, somewhere, at one step; every
# process prints what it raised as one JSON line.
DDP_SCENARIOS = r'''
import atexit, errno, json, os, sys
from pathlib import Path
import torch
import lra_soft.checkpoint
from lra_soft.distributed import rank
from lra_soft.engine import fit
from tests.test_engine import LOOP, Toy

class Failing(Toy):
    def __init__(self, where):
        super().__init__(LOOP)
        self.where = where
    def micro_batches(self, epoch, start):
        for i, batch in enumerate(super().micro_batches(epoch, start)):
            if self.where == "data" and rank() == 1 and epoch == 1 and start + i // 2 == 1:  # step 5's first
                raise ValueError("line 7 of train.tsv: 3 columns, expected 2")
            yield batch
    def loss(self, model, batch):
        if self.where == "step" and rank() == 1 and self.calls == 7:  # step 4's last micro-batch (DDP's sync)
            raise RuntimeError("out of memory")
        if self.where == "nan" and rank() == 1 and self.calls == 6:
            self.nan_at = 7
        return super().loss(model, batch)
    def record(self, step, *args):
        if self.where == "eval" and rank() == 1 and step == 4:
            raise RuntimeError("a dev file went missing")
        return super().record(step, *args)

save, saves = lra_soft.checkpoint.torch.save, []
def disk_full_on_rank_0(state, f, **kwargs):  # the second last.pt (step 4) finds the disk full
    if rank() == 0 and ".last.pt." in getattr(f, "name", ""):
        saves.append(f.name)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
    save(state, f, **kwargs)

out = Path(sys.argv[1])

def threads_at_exit():  # registered before init_distributed's cleanup, so it runs after it (atexit is LIFO)
    names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    with open(out / f"threads{os.environ['RANK']}.json", "w") as f:
        json.dump(names, f)
atexit.register(threads_at_exit)

for where in ("step", "data", "nan", "eval", "disk", "busy"):
    lra_soft.checkpoint.torch.save = disk_full_on_rank_0 if where == "disk" else save
    saves.clear()
    try:
        fit(Failing(where), out / where, device="cpu", progress=False)
        seen = {"raised": None}
    except Exception as e:
        seen = {"raised": type(e).__name__, "message": str(e)}
    with open(out / f"rank{rank()}.jsonl", "a") as f:
        f.write(json.dumps({"where": where, "rank": rank(), **seen}) + "\n")
# no cleanup() here on purpose: the group init_distributed joined is destroyed at exit, or gloo could abort the exit
'''


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_error_on_one_ddp_process_stops_every_process_with_one_message(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "scenarios.py"
    script.write_text(DDP_SCENARIOS)
    busy = tmp_path / "runs" / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from filelock import FileLock\n"
                               "with FileLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()",
                               str(busy / LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                               "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
                               str(tmp_path / "runs")], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (0, 1):  # the group is gone by exit: no gloo thread is left to abort the interpreter's finalisation
        threads = json.loads((tmp_path / "runs" / f"threads{r}.json").read_text())
        assert not [t for t in threads if "gloo" in t], threads
    lines = [json.loads(line) for r in (0, 1) for line in (tmp_path / "runs" / f"rank{r}.jsonl").open()]
    seen = {(r["where"], r["rank"]): r for r in lines}
    assert len(seen) == 12, lines
    expected = {  # where: (what every process raises, a piece of the one message, the step last.pt holds)
        "step": ("ProcessFailed", "process 1 of 2 failed: RuntimeError: out of memory; every process stopped "
                                  "after step 3, and the last good checkpoint is", 2),
        "data": ("ProcessFailed", "process 1 of 2 failed: ValueError: line 7 of train.tsv: 3 columns, expected 2; "
                                  "every process stopped after step 4", 4),
        "nan": ("TrainingDiverged", "at step 4; the run stopped and the last good checkpoint is", 2),
        "eval": ("ProcessFailed", "process 1 of 2 failed: RuntimeError: a dev file went missing; every process "
                                  "stopped after step 4", 2),
        "disk": ("ProcessFailed", "process 0 of 2 failed: DiskFull: ", 2),
        "busy": ("ProcessFailed", "process 0 of 2 failed: Busy: the run directory", None),
    }
    for where, (raised, piece, kept) in expected.items():
        a, b = seen[(where, 0)], seen[(where, 1)]
        assert a["raised"] == b["raised"] == raised and a["message"] == b["message"], (a, b)
        assert piece in a["message"], a["message"]
        if kept is not None:
            assert load_checkpoint(tmp_path / "runs" / where / "last.pt")["step"] == kept, where
            assert not (tmp_path / "runs" / where / "results.json").exists()
    disk = seen[("disk", 0)]["message"]
    assert "last.pt: no space left on device while writing it; the previous last.pt (" in disk
    assert f"is intact; the new one needs about" in disk and f"(step 2): --resume continues from it" in disk
