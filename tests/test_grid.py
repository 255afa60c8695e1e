"""grid: the plan, run states read from directories, the one-line errors, --status and --dry-run; then, on the
committed fixtures with 2 steps, a local 2 x 2 x 2 grid killed with SIGKILL and finished by a second invocation, a
failing run reported beside finished ones, and the Slurm launcher through submitit's own local executor."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tasks
from cli import app
from lra_soft import grid as G
from lra_soft.bench.specs import parse_specs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    for task in ("listops", "text"):
        tasks.prepare(task, FIXTURES / task, cache, progress=False)
    return cache


def _args(runs, data_dir, *extra, task=("listops", "text"), attn=("soft", "softmax"), seeds="0,1"):
    """A grid of 2-step fixture runs (clean protocol: batches padded to their longest sequence, at most 128)."""
    return ["grid", *[w for t in task for w in ("--task", t, "--source", f"{t}={FIXTURES / t}")],
            *[w for a in attn for w in ("--attn", a)], "--seeds", seeds, "--protocol", "clean", "--runs", str(runs),
            "--data-dir", str(data_dir), "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--max-len", "128",
            "--device", "cpu", "--no-progress", *extra]


def _config(runs, **kw):
    return G.GridConfig(tasks=kw.pop("tasks", ("listops", "text")),
                        attentions=tuple(parse_specs(kw.pop("attn", ["soft:window=8,iters=10", "softmax"]))),
                        seeds=(0, 1), protocol="clean", runs=runs, train={"steps": 2, "batch_size": 4}, **kw)


def _results(runs):
    return sorted(runs.rglob("results.json"))


# --------------------------------------------------------------------------------------------------- fast

def test_plan_one_run_per_cell_with_its_train_command(tmp_path):
    plan = G.make_plan(_config(tmp_path / "runs", data_options={"text": {"val": "test"}}))
    assert len(plan) == 8 and len({r.path for r in plan}) == 8
    soft = "listops/soft-iters=10-window=8"
    assert [r.name for r in plan[:4]] == [f"{soft}/seed0", f"{soft}/seed1", "listops/softmax/seed0",
                                          "listops/softmax/seed1"]
    run = plan[1]
    assert run.path == tmp_path / "runs" / "listops" / "soft-iters=10-window=8" / "seed1"
    args = list(run.args)
    assert args[:7] == ["listops", "--attn", "soft", "-o", "iters=10", "-o", "window=8"]
    assert args[args.index("--seed") + 1] == "1" and args[args.index("--out") + 1] == str(run.path.resolve())
    assert args[args.index("--steps") + 1] == "2" and args[-1] == "--no-progress"
    assert "--data-option" not in args and "val=test" in plan[-1].args
    assert run.command()[1:4] == ["-m", "cli", "train"] and "--resume" not in run.command()
    assert run.command(resume=True)[-1] == "--resume"
    two = run.command(gpus=2)
    assert two[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert run.shell().startswith("python cli.py train listops --attn soft -o iters=10")


def test_parsers():
    assert G.parse_seeds("0,1,2") == (0, 1, 2) and G.parse_seeds("3-5,9") == (3, 4, 5, 9)
    for bad in ("", "a", "1,1", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            G.parse_seeds(bad)
    assert G.per_task(["text:val=test", "text:max_length=9"], "--data-option", ":", ["text"]) == \
        {"text": ["val=test", "max_length=9"]}
    with pytest.raises(ValueError, match="not in this grid"):
        G.per_task(["image=x"], "--source", "=", ["listops"])
    with pytest.raises(ValueError, match="TASK=VALUE"):
        G.per_task(["listops"], "--source", "=", ["listops"])


def _attempt(run, returncode, interrupted=False, args=None):
    run.path.mkdir(parents=True, exist_ok=True)
    record = {"args": list(args or run.args), "attempts": [{"command": run.command(), "host": "h", "pid": 1,
                                                             "returncode": returncode, "interrupted": interrupted}]}
    (run.path / G.RECORD).write_text(json.dumps(record))


def test_state_is_read_from_the_run_directory(tmp_path):
    plan = G.make_plan(_config(tmp_path))
    assert {s.state for s in G.states(plan)} == {"pending"} and not tmp_path.joinpath("listops").exists()
    done, killed, crashed, failed, mine, other, ckpt = plan[:7]
    done.path.mkdir(parents=True)
    (done.path / "results.json").write_text(json.dumps({"test_acc": 0.25}))
    (done.path / "config.json").write_text(json.dumps({"train": {"steps": 2}}))
    _attempt(killed, None)                          # started, then SIGKILLed with the launcher: no exit status
    _attempt(crashed, -9, interrupted=True)         # killed by a signal
    _attempt(failed, 1)
    (failed.path / G.LOG).write_text("step 1\nerror: attention dropout is only implemented on the fused path\n")
    _attempt(other, 0, args=[a if a != "2" else "3" for a in other.args])
    ckpt.path.mkdir(parents=True)
    (ckpt.path / "last.pt").write_bytes(b"")
    (ckpt.path / "metrics.jsonl").write_text('{"step": 50}\n{"step": 100}\n{"step": 1')  # a line cut by a kill
    fd = G._try_lock(mine.path / G.LOCK)            # another process holds the run's lock
    try:
        got = {s.run.path: s for s in G.states(plan)}
        assert got[done.path].state == "done" and got[done.path].test_acc == 0.25 and got[done.path].steps == 2
        assert got[killed.path].state == "interrupted" and got[crashed.path].state == "interrupted"
        assert got[failed.path].state == "failed"
        assert got[failed.path].note == "error: attention dropout is only implemented on the fused path"
        assert G.describe(got[failed.path]).endswith(f"log {failed.path / G.LOG}")
        assert got[mine.path].state == "running"
        assert got[ckpt.path].state == "interrupted" and got[ckpt.path].step == 100
        assert got[other.path].state == "conflict" and "--steps 3" in got[other.path].note
        assert got[plan[7].path].state == "pending"
        assert G.to_run(list(got.values())) == [killed, crashed, failed, ckpt, plan[7]]
        with pytest.raises(ValueError, match="other train arguments"):
            G.check_conflicts(list(got.values()))
        table = G.status_table(list(got.values()))
        assert "| listops | softmax | 1 | failed | – | – | error: attention dropout" in table
        assert table.endswith("1 done, 1 running, 3 interrupted, 1 failed, 1 pending, 1 conflict of 8 runs")
    finally:
        os.close(fd)
    assert not G._locked(mine)  # released with its descriptor
    # Where or how a run executes is not the experiment: another --device is no conflict.
    _attempt(plan[7], None, args=[a if a != "cpu" else "cuda" for a in plan[7].args])
    assert G.read_state(plan[7]).state == "interrupted"


def test_bad_input_is_one_line_before_any_work(tmp_path, data_dir):
    runs = tmp_path / "runs"
    for extra, needle in (
            (["--attn", "soft:bogus=1"], "unknown option(s) ['bogus'] for attention 'soft'"),
            (["--attn", "soft:window=0"], "--attn (task listops) soft:window=0: window must be a positive integer"),
            (["--source", "image=x"], "--source image=x: task 'image' is not in this grid"),
            (["--data-option", "listops:nope=1"], "--data-option nope=1"),
            (["--seeds", "1,1"], "--seeds '1,1'"),
            (["--steps", "0"], "--steps 0: must be >= 1"),
            (["--gpus-per-job", "2"], "--gpus-per-job 2: this machine has no CUDA device")):
        out = runner.invoke(app, _args(runs, tmp_path / "cache", *extra, task=("listops",), attn=()))
        assert out.exit_code == 1, (extra, out.output)
        assert out.output.startswith("error: ") and needle in out.output and out.output.count("\n") == 1, out.output
    assert not runs.exists() and not (tmp_path / "cache").exists()


def test_status_and_dry_run_write_nothing(tmp_path, data_dir):
    runs = tmp_path / "runs"
    out = runner.invoke(app, _args(runs, data_dir, "--status"))
    assert out.exit_code == 0, out.output
    assert out.output.count("| pending |") == 8 and "8 pending of 8 runs" in out.output
    out = runner.invoke(app, _args(runs, data_dir, "--dry-run", "--no-measure"))
    assert out.exit_code == 0, out.output
    assert out.output.count("| not measured | 2 |") == 8 and "Left to run: nothing measured" in out.output
    commands = [line for line in out.output.splitlines() if line.startswith("python cli.py train")]
    assert len(commands) == 8 and "--seed 1" in commands[1] and "--resume" not in out.output
    assert not runs.exists()


def test_estimate_is_the_measured_step_times_the_schedule(tmp_path, data_dir):
    cfg = G.GridConfig(tasks=("listops",), attentions=tuple(parse_specs(["softmax"])), seeds=(0,), protocol="clean",
                       runs=tmp_path, data_dir=data_dir, device="cpu",
                       train={"steps": 5, "batch_size": 4, "eval_every": 2, "max_len": 64})
    est = G.estimate(cfg, "listops", cfg.attentions[0], repeats=1)
    # 3 evaluations (steps 2, 4, 5) of the 8 dev examples in batches of 4, then the 8 test examples: 8 batches.
    assert est.steps == 5 and est.eval_batches == 3 * 2 + 2
    assert est.shape == "4 x 64 tokens on cpu"  # a quick step: timed at the run's batch itself
    assert est.step_s > 0 and est.infer_s > 0
    assert est.seconds == pytest.approx(5 * est.step_s + 8 * est.infer_s)
    assert G.estimate(cfg, "listops", cfg.attentions[0], gpus=2, measure=False).shape.startswith("2 x 64 tokens")


def test_slurm_job_script(tmp_path, monkeypatch):
    """What sbatch would receive, from submitit's own Slurm executor (srun faked present: no cluster here)."""
    import submitit

    with pytest.raises(ValueError, match="--launcher slurm: Could not detect \"srun\""):
        G.slurm_executor(tmp_path / "%j")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    ex = G.slurm_executor(tmp_path / "%j", partition="gpu", timeout_min=720, gpus_per_job=4,
                          options={"account": "lra", "qos": "high"})
    script = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=1", "--nodes=1", "--time=720",
                 "--cpus-per-task=32", "--account=lra", "--qos=high", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in script, line
    with pytest.raises(ValueError, match="--slurm-option"):
        G.slurm_executor(tmp_path / "%j", options={"no_such_parameter": 1})


def test_checkpoint_stops_the_training_and_requeues_the_same_run(tmp_path):
    """submitit calls checkpoint() on a timeout: the training stops, and a fresh job of the same run is requeued."""
    run = G.make_plan(_config(tmp_path))[0]
    job = G.RunJob(run, gpus=2, table_plan=(run,), table_root=tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    job._started(child)
    again = job.checkpoint()
    assert child.poll() == -signal.SIGTERM
    assert isinstance(again.function, G.RunJob) and again.function is not job
    assert (again.function.run, again.function.gpus, again.function.table_root) == (run, 2, tmp_path)
    assert pickle.loads(pickle.dumps(job))._child is None  # a process handle never travels with a requeue


# --------------------------------------------------------------------------------------------------- trainings

@pytest.mark.slow
def test_local_grid_killed_then_finished_without_redoing_runs(tmp_path, data_dir):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *_args(runs, data_dir)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_results(runs)) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the grid and its training, at once, as a power cut would
    proc.wait()
    first = {p: (p.stat().st_mtime_ns, p.read_text()) for p in _results(runs)}
    assert 3 <= len(first) < 8, "the grid finished (or never started) before the kill; the test proved nothing"

    out = runner.invoke(app, _args(runs, data_dir))
    assert out.exit_code == 0, out.output
    assert out.output.count(": done, test") == 8 and out.output.count("starting") == 8 - len(first)
    assert len(_results(runs)) == 8
    for path, (mtime, text) in first.items():  # finished runs untouched
        assert (path.stat().st_mtime_ns, path.read_text()) == (mtime, text), path
        assert len(json.loads((path.parent / G.RECORD).read_text())["attempts"]) == 1
    table = json.loads((runs / "grid.json").read_text())
    assert len(table["rows"]) == 4 and {r["n"] for r in table["rows"]} == {2}
    assert all(r["seeds"] == [0, 1] and r["std"] is not None for r in table["rows"])
    assert (runs / "grid.md").read_text().count("(n=2)") == 4 and (runs / "grid.png").stat().st_size > 0
    assert (runs / "grid.csv").read_text().splitlines()[0].startswith("comparable,task,attention")

    again = runner.invoke(app, _args(runs, data_dir))  # idempotent: nothing left to start
    assert again.exit_code == 0 and "starting" not in again.output and again.output.count(": done, test") == 8


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, data_dir):
    # The manual softmax path has no attention dropout, which the protocol sets: it fails at its first step.
    runs = tmp_path / "runs"
    out = runner.invoke(app, _args(runs, data_dir, task=("listops",), attn=("softmax:fused=False", "soft"),
                                   seeds="0"))
    assert out.exit_code == 1
    log = runs / "listops" / "softmax-fused=False" / "seed0" / G.LOG
    assert f"failed: error: attention dropout is only implemented on the fused path; log {log}" in out.output
    assert "1 of 2 runs failed" in out.output and "listops/soft/seed0: done, test" in out.output
    assert "error: attention dropout" in log.read_text()
    assert [p.parent.name for p in _results(runs)] == ["seed0"] and (runs / "grid.md").exists()
    status = runner.invoke(app, _args(runs, data_dir, "--status", task=("listops",),
                                      attn=("softmax:fused=False", "soft"), seeds="0"))
    assert "| listops | softmax:fused=False | 0 | failed |" in status.output and str(log) in status.output


@pytest.mark.slow
def test_slurm_launcher_through_submitits_local_executor(tmp_path, data_dir):
    """Each run a submitit job (a process of submitit's own): an interrupted run resumes, a finished one is not
    submitted again."""
    runs = tmp_path / "runs"
    args = _args(runs, data_dir, "--launcher", "slurm", "--submitit-cluster", "local", "--wait", "--timeout-min",
                 "10", task=("listops",), attn=("soft",))
    plan = G.make_plan(G.GridConfig(tasks=("listops",), attentions=tuple(parse_specs(["soft"])), seeds=(0, 1),
                                    protocol="clean", runs=runs, data_dir=data_dir,
                                    sources={"listops": str(FIXTURES / "listops")}, device="cpu",
                                    train={"steps": 2, "batch_size": 4, "eval_every": 2, "max_len": 128}))
    # seed 0 trained to its last checkpoint, results.json lost: interrupted, to be resumed.
    subprocess.run(plan[0].command(), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=120)
    (plan[0].path / "results.json").unlink()
    assert [s.state for s in G.states(plan)] == ["interrupted", "pending"]

    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert out.output.count("submitted as job") == 2 and (runs / ".submitit").is_dir()
    commands = [json.loads((r.path / G.RECORD).read_text())["attempts"][-1]["command"] for r in plan]
    assert commands[0] == plan[0].command(resume=True) and commands[1] == plan[1].command()
    assert [s.state for s in G.states(plan)] == ["done", "done"]
    assert "(n=2)" in (runs / "grid.md").read_text()

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "submitted as job" not in again.output and "(n=2)" in again.output
    assert [len(json.loads((r.path / G.RECORD).read_text())["attempts"]) for r in plan] == [1, 1]


def test_a_slow_cpu_step_is_extrapolated_from_smaller_batches(tmp_path, monkeypatch):
    import lra_soft.bench.model

    calls = []

    def affine(enc, batch, n, **kw):  # a step: 3 s fixed (the optimizer) + 1 s per example; inference half of it
        calls.append(batch)
        return {"step_s": 3.0 + batch, "infer_s": (3.0 + batch) / 2, "device": "cpu"}

    monkeypatch.setattr(lra_soft.bench.model, "time_encoder_step", affine)
    cfg = G.GridConfig(tasks=("listops",), attentions=tuple(parse_specs(["softmax"])), seeds=(0,), runs=tmp_path,
                       data_dir=tmp_path, device="cpu", train={"steps": 10, "batch_size": 32})
    est = G.estimate(cfg, "listops", cfg.attentions[0])
    assert calls == [1, 2, 4]  # 7 s at batch 4 is past PROBE_S: no longer batch is timed
    assert est.step_s == pytest.approx(35.0) and est.infer_s == pytest.approx(17.5)
    assert est.eval_batches is None and est.seconds == pytest.approx(350.0)  # no prepared data: steps only
    assert est.shape == "32 x 2048 tokens on cpu (timed at batch 2 and 4, extrapolated)"
