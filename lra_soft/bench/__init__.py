"""Benchmarks of the paper's efficiency claims (Figure 1b, Table 1): attention-level and model-level, time, memory,
FLOPs and reference floors. ``python cli.py bench --help`` is the command line; this package is the library.

    from lra_soft.bench import AttentionBenchConfig, parse_specs, run_attention_bench, save
    result = run_attention_bench(parse_specs(["soft", "softmax"]), AttentionBenchConfig(lengths=(1024, 4096)))
    save(result, Path("runs/bench"))
"""
from lra_soft.bench.attention import AttentionBenchConfig, run_attention_bench
from lra_soft.bench.measure import (Timing, count_flops, matmul_rate, newton_products, newton_products_time,
                                    peak_memory, time_fn, time_rounds)
from lra_soft.bench.model import FIG1B, FIG1B_ATTENTIONS, ModelBenchConfig, fig1b_config, run_model_bench
from lra_soft.bench.report import environment, markdown_table, plot, save
from lra_soft.bench.specs import AttentionSpec, parse_lengths, parse_specs

__all__ = ["FIG1B", "FIG1B_ATTENTIONS", "AttentionBenchConfig", "AttentionSpec", "ModelBenchConfig", "Timing",
           "count_flops", "environment", "fig1b_config", "markdown_table", "matmul_rate", "newton_products",
           "newton_products_time", "parse_lengths", "parse_specs", "peak_memory", "plot",
           "run_attention_bench", "run_model_bench", "save", "time_fn", "time_rounds"]
