"""The paper protocol equals the Nystromformer harness computation, re-derived here from its description (MEAN over
the padded length, softmax attention with a -1e6 key mask, OneCycleLR with cycle_momentum); comparability checks;
the CLI's protocol flags and the eval-all grouping on real short runs."""
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import tasks
from cli import app
from lra_soft import protocol as P
from lra_soft.encoder import build_model
from lra_soft.train import OneCycle, resolve_configs

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
runner = CliRunner()


def _paper_configs(attention="softmax", **overrides):
    module = tasks.get_task("listops")
    return resolve_configs(module.MODEL, module.TRAIN, protocol=P.get_protocol("paper", "listops"),
                           attention=attention, **overrides)


def _harness_logits(model, ids, mask):
    """The harness's ModelForSC forward, written out (dropout off): embeddings, pre-LN blocks with
    dot - 1e6 * (1 - mask) softmax attention, final LN * mask, mean over ALL positions, SCHead."""
    enc, maskf = model.encoder, mask.float()
    x = enc.tokens(ids) + enc.positions(torch.arange(ids.shape[1]))[None]
    for blk in enc.blocks:
        a, h = blk.attn, blk.attn.heads
        y = blk.norm1(x)
        b, n, c = y.shape
        q, k, v = (w(y).reshape(b, n, h, c // h).transpose(1, 2) for w in (a.W_q, a.W_k, a.W_v))
        dot = q @ k.transpose(-2, -1) / math.sqrt(c // h) - 1e6 * (1 - maskf[:, None, None, :])
        out = (dot.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = a.ff(out) + x
        m = blk.mlp
        x = m[3](F.gelu(m[0](blk.norm2(x)))) + x
    x = enc.norm(x) * maskf[:, :, None]
    return model.head(x.mean(dim=1))


def test_paper_protocol_equals_the_harness_computation():
    model_cfg, train_cfg = _paper_configs(dropout=0.0, attention_options={"attn_dropout": 0.0})
    model_cfg = replace(model_cfg, max_len=64)
    assert model_cfg.pooling == "mean_padded" and train_cfg.pad_to == 2048 and train_cfg.beta1_cycle == (0.95, 0.85)
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    ids = torch.randint(1, model_cfg.vocab_size, (3, 64))
    mask = torch.ones(3, 64, dtype=torch.bool)
    mask[0, 40:], mask[1, 10:] = False, False  # fixed padding: the batch is padded to the model length
    ids[~mask] = 0
    labels = torch.tensor([1, 7, 9])

    ours = model(ids, mask)
    loss = F.cross_entropy(ours, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = _harness_logits(model, ids, mask)
    ref_loss = F.cross_entropy(ref, labels)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("at", [0, 999, 1000, 4999])
def test_schedule_and_optimizer_step_equal_onecycle_with_cycle_momentum(at):
    _, train_cfg = _paper_configs()
    torch.manual_seed(0)
    ours_p, ref_p = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    with torch.no_grad():
        ref_p.copy_(ours_p)
    ours_opt = torch.optim.AdamW([ours_p], lr=train_cfg.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([ref_p], lr=train_cfg.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    ours = OneCycle(ours_opt, train_cfg.steps, train_cfg.warmup, train_cfg.beta1_cycle)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=train_cfg.lr, total_steps=train_cfg.steps,
                                              pct_start=train_cfg.warmup / train_cfg.steps, anneal_strategy="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler steps without optimizer steps, to reach step `at` quickly
        for _ in range(at):
            ours.step()
            ref.step()
    expect_beta1 = {0: 0.95, 999: 0.85, 1000: 0.85 + 0.1 / 4000, 4999: 0.95}[at]
    for opt in (ours_opt, ref_opt):
        assert opt.param_groups[0]["betas"][0] == pytest.approx(expect_beta1, abs=1e-12)
    assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
    # Two optimizer steps (the second uses the moment estimates of the first), one at the last step of the run.
    for _ in range(2 if at + 1 < train_cfg.steps else 1):
        assert ours_opt.param_groups[0]["betas"] == pytest.approx(ref_opt.param_groups[0]["betas"], abs=1e-15)
        grad = torch.randn(5)
        for p, opt in ((ours_p, ours_opt), (ref_p, ref_opt)):
            p.grad = grad.clone()
            opt.step()
        ours.step()
        ref.step()
        torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=0)


def test_attention_dropout_of_the_paper_protocol_trains_and_not_evaluates():
    for name in P.TABLE6_ATTENTIONS:
        model_cfg, _ = _paper_configs(attention=name, dropout=0.0)
        has = "attn_dropout" in model_cfg.attention_options
        assert has == (name == "softmax"), name  # the harness drops attention weights in softmax only
    model_cfg, _ = _paper_configs(dropout=0.0)
    assert model_cfg.attention_options == {"attn_dropout": 0.1}
    torch.manual_seed(0)
    model = build_model(replace(model_cfg, max_len=32))
    ids, mask = torch.randint(1, 16, (2, 32)), torch.ones(2, 32, dtype=torch.bool)
    model.train()
    assert not torch.equal(model(ids, mask), model(ids, mask))  # only attention dropout is random here
    model.eval()
    plain = build_model(replace(model_cfg, max_len=32, attention_options={"attn_dropout": 0.0}))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(model(ids, mask), plain(ids, mask), rtol=0, atol=0)


def _diffs(model_cfg, train_cfg, counts=None, data_options=None, task="listops", device="cpu"):
    module = tasks.get_task(task)
    return P.differences(task, model_cfg, train_cfg, task_model=module.MODEL, task_train=module.TRAIN,
                         counts=counts, data_options=data_options, device=device)


STANDARD = {"train": 96000, "val": 2000, "test": 2000}


def test_comparable_only_in_the_papers_setting():
    assert _diffs(*_paper_configs(), counts=STANDARD, data_options={}) == []
    assert _diffs(*_paper_configs(attention="soft"), counts=STANDARD) == []
    assert _diffs(*_paper_configs(pooling="mean")) == ["pooling mean != mean_padded"]
    assert _diffs(*_paper_configs(steps=200)) == ["steps 200 != 5000"]
    assert _diffs(*_paper_configs(attention="soft", attention_options={"num_landmarks": 64})) == [
        "num_landmarks=64 (paper none)"]
    assert _diffs(*_paper_configs(attention_options={"attn_dropout": 0.0})) == ["attn_dropout=0.0 (paper 0.1)"]
    assert _diffs(*_paper_configs(precision="bf16")) == []                       # CPU runs fp32 anyway
    assert _diffs(*_paper_configs(precision="bf16"), device="cuda") == ["precision bf16 != fp16 on CUDA"]
    assert _diffs(*_paper_configs(), counts={"train": 24, "val": 8, "test": 8}) == [
        "train examples 24 != 96000", "test examples 8 != 2000"]
    module = tasks.get_task("listops")
    clean = resolve_configs(module.MODEL, module.TRAIN, protocol=P.get_protocol("clean", "listops"),
                            attention="softmax")
    assert _diffs(*clean) == ["protocol clean != paper", "pooling mean != mean_padded", "pad_to 0 != 2048"]
    text = tasks.get_task("text")
    text_cfgs = resolve_configs(text.MODEL, text.TRAIN, protocol=P.get_protocol("paper", "text"), attention="soft")
    assert _diffs(*text_cfgs, task="text", data_options={"val": "split"}) == [
        "data option val=split (paper test)"]
    assert _diffs(*_paper_configs(attention="gaussian")) == ["attention gaussian is not in Table 6"]
    assert P.differences("pathfinder", *clean, task_model=module.MODEL, task_train=module.TRAIN)[0].startswith(
        "task pathfinder is not in Table 6")


def test_unknown_protocol_and_precision_fail_listing_the_choices(tmp_path):
    for flag, value, listed in (("--protocol", "harness", "'paper', 'clean'"),
                                ("--precision", "fp8", "'fp16', 'bf16', 'fp32'")):
        out = runner.invoke(app, ["train", "listops", flag, value, "--data-dir", str(tmp_path / "d")])
        text = " ".join(out.output.replace("│", " ").split())  # the usage-error panel wraps
        assert out.exit_code == 2 and f"'{value}' is not one of {listed}" in text
    assert not (tmp_path / "d").exists()  # failed before any data was touched


def _train(out, data_dir, *extra):
    return runner.invoke(app, ["train", "listops", "--source", str(FIXTURES / "listops"), "--data-dir",
                               str(data_dir), "--out", str(out), "--batch-size", "4", "--eval-every", "2",
                               "--device", "cpu", "--no-progress", *extra])


@pytest.mark.slow  # four trainings, every batch padded to 2,048 tokens
def test_paper_runs_record_their_protocol_and_eval_all_groups_them(tmp_path):
    data, runs = tmp_path / "cache", tmp_path / "runs"
    for seed in (0, 1):
        res = _train(runs / f"s{seed}", data, "--attn", "softmax", "--steps", "2", "--seed", str(seed))
        assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("protocol paper: not comparable with Table 6 (steps 2 != 5000; batch_size 4 != 32")
    res = _train(runs / "mean", data, "--attn", "softmax", "--steps", "2", "--pooling", "mean")
    assert "pooling mean != mean_padded" in res.output.splitlines()[0]
    res = _train(runs / "three", data, "--attn", "softmax", "--steps", "3")
    assert res.exit_code == 0, res.output

    config = json.loads((runs / "s0" / "config.json").read_text())
    results = json.loads((runs / "s0" / "results.json").read_text())
    assert config["train"]["protocol"] == "paper" and config["train"]["pad_to"] == 2048
    assert config["model"]["pooling"] == "mean_padded" and config["train"]["beta1_cycle"] == [0.95, 0.85]
    assert results["protocol"] == "paper" and results["comparable"] is False
    assert "train examples 24 != 96000" in results["differences"]
    rows = [json.loads(line) for line in (runs / "s0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["beta1"] == pytest.approx(0.85)  # two steps, all warmup: beta1 at its base at the peak lr

    out = runner.invoke(app, ["eval-all", "--runs", str(runs)])
    assert out.exit_code == 0, out.output
    table = json.loads((runs / "eval_all.json").read_text())["rows"]
    assert len(table) == 3  # two seeds share a row; --pooling mean and --steps 3 are experiments of their own
    two = next(r for r in table if r["n"] == 2)
    accs = [100 * json.loads((runs / s / "results.json").read_text())["test_acc"] for s in ("s0", "s1")]
    assert two["seeds"] == [0, 1] and two["mean"] == pytest.approx(sum(accs) / 2)
    assert two["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert all(r["paper"] is None and not r["comparable"] for r in table)  # a 2-step run never sits by a paper figure
    assert sorted(r["steps"] for r in table) == [2, 2, 3]
    assert "Not comparable" in out.output and "37.10" not in out.output


def test_docs_list_every_change_and_departure():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocols.md").read_text()
    for what, why in (*P.CLEAN_CHANGES, *P.PAPER_DEPARTURES):
        assert f"| {what} | {why} |" in doc, what
