"""The training engine (``lra_soft.engine``) on a toy recipe: one step over micro-batches equals one full batch,
micro-batches are drawn lazily, a diverged step changes nothing, run directories refuse or resume, and a stopped run
resumed ends bit-identical to an uninterrupted one (with an EMA and gradient accumulation)."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lra_soft.checkpoint import CheckpointError, load_checkpoint
from lra_soft.engine import Loop, Recipe, RunDir, TrainingDiverged, _steps, fit, train_step


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
