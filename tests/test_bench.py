"""The benchmark: measuring primitives against known answers, tiny runs through the library and the CLI, clear errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lra_soft.bench import (AttentionBenchConfig, ModelBenchConfig, Timing, count_flops, newton_products,
                            parse_specs, peak_memory, run_attention_bench, run_model_bench, time_fn)
from lra_soft.bench.attention import landmark_count, padding_mask
from lra_soft.bench.model import FIG1B
from lra_soft.bench.report import markdown_table

CPU = torch.device("cpu")
TINY = ["--lengths", "32,64", "--batch", "1", "--heads", "2", "--head-dim", "8", "--warmup", "0", "--repeats", "1",
        "--matmul-size", "64", "--no-progress"]


def test_timing_quartiles_and_median():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q1, t.q3, t.min, t.max, t.repeats) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    with pytest.raises(ValueError, match="repeats"):
        Timing.of([])


def test_time_fn_is_positive_and_counts_calls():
    calls = []
    t = time_fn(lambda: calls.append(1), CPU, warmup=2, repeats=3)
    assert len(calls) == 5 and t.repeats == 3 and 0 < t.min <= t.median <= t.max


def test_cpu_peak_memory_is_the_allocator_peak():
    mib = 2**20

    def two_live_then_one():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(4 * mib, dtype=torch.uint8)  # a and b alive together: 8 MiB
        del a, b
        c = torch.empty(6 * mib, dtype=torch.uint8)  # 6 MiB alone: below the peak
        return c.numel()

    peak = peak_memory(two_live_then_one, CPU)
    assert 8 * mib <= peak < 8 * mib + 64 * 1024
    assert peak_memory(lambda: torch.empty(mib, dtype=torch.uint8), CPU) < peak


def test_flop_count_of_a_matmul_and_of_the_newton_floor():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    # 2 batched (batch, m, m) products per iteration, 2 m^3 FLOPs each.
    assert count_flops(newton_products(3, 16, CPU, iters=5)) == 5 * 2 * 3 * 2 * 16**3
    # SDPA on CPU (its flash kernel): q k^T and p v, 2 n^2 d each, forward; the backward counts 2.5 times that.
    q, k, v = (torch.randn(2, 3, 64, 16, requires_grad=True) for _ in range(3))
    forward = 4 * 2 * 3 * 64 * 64 * 16
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == forward
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()) == \
        forward * 7 // 2


def test_specs_parse_and_validate():
    specs = parse_specs(["soft:num_landmarks=16,inverse=solve", "softmax", "soft"], ["iters=7"])
    assert specs[0].options == {"iters": 7, "num_landmarks": 16, "inverse": "solve"}
    assert specs[1].options == {}  # softmax takes no `iters`
    assert specs[2].options == {"iters": 7} and specs[2].label == "soft"
    assert landmark_count(specs[0], 1000) == 16 and landmark_count(specs[2], 1001) == 251
    with pytest.raises(ValueError, match="unknown attention 'sofmax'.*choose from"):
        parse_specs(["sofmax"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\] for attention 'soft'"):
        parse_specs(["soft:windw=4"])
    with pytest.raises(ValueError, match="accepted by none"):
        parse_specs(["softmax"], ["window=4"])
    with pytest.raises(ValueError, match="key=value"):
        parse_specs(["soft:window"])


def test_padding_mask_lengths():
    mask = padding_mask(4, 16, CPU)
    assert mask.sum(1).tolist() == [16, 14, 12, 10] and mask[:, 0].all()


def test_attention_bench_library_tiny():
    specs = parse_specs(["soft", "softmax", "soft:num_landmarks=8"], ["iters=3"])  # few Newton steps: fast
    cfg = AttentionBenchConfig(lengths=(32, 64), batch=1, heads=2, head_dim=8, warmup=0, repeats=2, matmul_size=64,
                               mask=True)
    result = run_attention_bench(specs, cfg)
    rows = {(r["attention"], r["n"]): r for r in result["rows"]}
    assert len(rows) == 6 and result["reference"]["matmul_gflops_per_s"] > 0
    for (label, n), r in rows.items():
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["fwd_mem_mb"] > 0 and r["fwdbwd_mem_mb"] > 0
        assert r["fwdbwd_gflop"] > 0 and r["fwdbwd_x_softmax"] > 0
        if n == 64:  # twice the tokens: more memory for every attention
            assert r["fwdbwd_mem_mb"] > rows[(label, 32)]["fwdbwd_mem_mb"]
    assert rows[("softmax", 64)]["fwdbwd_x_softmax"] == 1.0
    assert rows[("soft", 64)]["m"] == 16 and rows[("soft:num_landmarks=8", 64)]["m"] == 8
    assert rows[("soft", 64)]["newton_floor_ms"] > 0 and "newton_floor_ms" not in rows[("softmax", 64)]
    assert {g["attention"] for g in result["growth"]} == {"soft", "softmax", "soft:num_landmarks=8"}
    table = markdown_table(result)
    assert table.count("\n| soft") >= 4 and "GFLOP/s" in table


def test_cli_bench_writes_table_json_csv_png(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--attn", "soft:iters=3", "--attn", "softmax", "--out", str(tmp_path),
                                   "--name", "tiny", *TINY])
    assert res.exit_code == 0, res.output
    assert "| soft:iters=3 |" in res.output and "fwd+bwd MiB" in res.output
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["mode"] == "attention" and len(data["rows"]) == 4 and data["command"].startswith("python cli.py bench")
    assert data["environment"]["torch"] == torch.__version__
    with open(tmp_path / "tiny.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "tiny.md").read_text().startswith("Command: `python cli.py bench")
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("args, message", [
    (["--attn", "nosuch"], "unknown attention 'nosuch'"),
    (["--attn", "soft", "--option", "nosuch=1"], "accepted by none"),
    (["--attn", "soft:nosuch=1"], "unknown option(s) ['nosuch']"),
    (["--attn", "soft", "--lengths", "12,x"], "comma-separated positive integers"),
])
def test_cli_bench_bad_input_fails_clearly(tmp_path, args, message):
    res = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 1 and message in res.output
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # torch.compile
def test_cli_bench_compiled_rows(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--attn", "softmax", "--compile", "--compile-backend", "eager",
                                   "--no-flops", "--no-floors", "--out", str(tmp_path), *TINY])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted(r["compiled"] for r in rows) == [False, False, True, True]
    assert [r["graph_breaks"] for r in rows if r["compiled"]] == [0, 0]  # reported for compiled rows
    assert all(r["fwdbwd_ms"] > 0 for r in rows)


def test_model_bench_lra_tiny():
    cfg = ModelBenchConfig(model="lra", lengths=(32, 64), batch=2, dim=16, depth=1, heads=2, mlp_dim=32, repeats=1)
    result = run_model_bench(parse_specs(["soft:num_landmarks=8,iters=3", "softmax"]), cfg)
    rows = {(r["attention"], r["n"]): r for r in result["rows"]}
    for (label, n), r in rows.items():
        assert r["unit"] == "tokens/s" and r["items_per_s"] > 0 and r["step_mem_mb"] > 0 and r["infer_mem_mb"] > 0
        assert r["items_per_s"] == pytest.approx(2 * n / (r["step_ms"] / 1e3))
    soft = "soft:num_landmarks=8,iters=3"
    assert rows[(soft, 64)]["step_mem_mb"] > rows[(soft, 32)]["step_mem_mb"]
    assert rows[("softmax", 32)]["items_per_s_x_softmax"] == 1.0


def test_cli_bench_model_lra_and_fig1b_protocol(tmp_path):
    assert FIG1B.lengths == tuple(784 * p for p in range(1, 9))
    assert (FIG1B.batch, FIG1B.depth, FIG1B.dim, FIG1B.heads) == (1, 12, 384, 12)
    res = CliRunner().invoke(app, ["bench", "--preset", "fig1b", "--attn", "soft:num_landmarks=49,iters=3", "--lengths", "64",
                                   "--depth", "1", "--heads", "2", "--out", str(tmp_path), "--no-progress",
                                   "--repeats", "1", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert (row["n"], row["batch"], row["depth"], row["dim"]) == (64, 1, 1, 64)
    assert row["options"]["num_landmarks"] == 49 and row["step_mem_mb"] > 0


@pytest.mark.slow  # builds and times a SOFT ImageNet backbone
def test_model_bench_imagenet_tiny():
    vision = pytest.importorskip("lra_soft.vision")
    small = dict(dims=(32, 32, 32, 32), heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), iters=3)  # soft_tiny, thinner
    size = vision.preset("soft_tiny").min_img_size
    cfg = ModelBenchConfig(model="imagenet", lengths=(size,), batch=2, variants=("soft_tiny",), repeats=1,
                           vision_options=small)
    (row,) = run_model_bench([], cfg)["rows"]
    assert row["unit"] == "images/s" and row["img_size"] == size and row["items_per_s"] > 0
    assert row["step_mem_mb"] > 0 and row["params_m"] < 1


@pytest.mark.gpu
def test_attention_bench_cuda():
    cfg = AttentionBenchConfig(lengths=(64, 128), batch=1, heads=2, head_dim=8, warmup=1, repeats=2, device="cuda",
                               matmul_size=256, autocast="bfloat16")
    result = run_attention_bench(parse_specs(["soft", "softmax"]), cfg)
    assert all(r["fwdbwd_ms"] > 0 and r["fwdbwd_mem_mb"] > 0 for r in result["rows"])


def test_targets_summary_reads_the_result_files(tmp_path):
    from lra_soft.bench.targets import summarize

    def row(attention, n, ms, mem=1.0, **extra):
        return {"attention": attention, "n": n, "compiled": False, "fwdbwd_ms": ms, "fwdbwd_mem_mb": mem, **extra}

    (tmp_path / "lra-setting.json").write_text(json.dumps({"reference": {"matmul_gflops_per_s": 100.0}, "rows": [
        row("softmax", 4096, 10.0), row("soft:inverse=solve", 4096, 9.0, fwdbwd_x_softmax=0.9),
        row("soft", 4096, 40.0, fwdbwd_x_softmax=4.0, fwdbwd_x_newton_floor=1.5)]}))
    (tmp_path / "fixed-m64.json").write_text(json.dumps({"rows": [
        row("softmax", 16384, 100.0, 40.0), row("soft:num_landmarks=64", 4096, 1.0, 10.0),
        row("soft:num_landmarks=64", 16384, 4.0, 50.0)]}))
    (tmp_path / "listops-encoder.json").write_text(json.dumps({"rows": [
        {"attention": "softmax", "n": 2048, "step_ms": 100.0},
        {"attention": "soft", "n": 2048, "step_ms": 240.0}]}))
    lines = summarize(tmp_path).splitlines()
    get = {line.split(" | ")[0][2:]: line for line in lines}
    assert "| 0.90 | NOT met |" in get["SOFT window 4, inverse=solve, n=4096: time / SDPA"]
    assert "| 4.00 | met |" in get["SOFT window 4, newton 20 (m=1024), n=4096, training: time / SDPA"]
    assert "| 25.00 | met |" in get["SOFT m=64, n=16384: SDPA time / SOFT time"]
    assert "| 1.25 | NOT met |" in get["SOFT m=64, n=16384: peak memory / SDPA's"]
    assert "| 2.40 | met |" in get["same, SOFT in the paper's setting (window 4): step time / softmax's"]
    assert "| 4.00 | met |" in get["SOFT m=64: time(16384) / time(4096)"]
    assert "| 5.00 | NOT met |" in get["SOFT m=64: peak memory(16384) / peak memory(4096)"]
    assert "not measured" in get["LRA encoder, ListOps n=2048 batch 32, SOFT m=64: tokens/s / softmax's"]
