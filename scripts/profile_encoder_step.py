"""Where one training step of the LRA encoder spends its time, per attention: torch.profiler on the CPU, self time of
every op, summed by the part of the model that ran it.

    python scripts/profile_encoder_step.py --attn softmax --attn soft:num_landmarks=64 --threads 1
    python scripts/profile_encoder_step.py --attn soft --ops 30     # also torch's table of the 30 costliest ops

The step is the benchmark's (`lra_soft.bench.model`: random ListOps-sized batch, the engine's `train_step` with
AdamW, dropout 0.1), warmed up twice, then profiled once. Forward ops belong to the innermost module whose forward ran
them (each module's forward is wrapped in a `record_function`); backward ops to the autograd node that ran them,
named after the forward op (AddmmBackward0: a Linear, _MaskedScaleBackward: our dropout, ...). Whatever is neither,
the head split and merge and the landmark sampling among them, counts as the attention's core.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import profile, record_function

from lra_soft.bench.model import ModelBenchConfig, _lra_trainer
from lra_soft.bench.specs import parse_specs

PARTS = ("attention core", "Linear layers", "dropout", "GELU", "LayerNorm", "residual adds",
         "embeddings, positions, pooling, loss", "optimizer")
BACKWARD = {"AddmmBackward0": "Linear layers", "MmBackward0": "Linear layers", "TBackward0": "Linear layers",
            "_MaskedScaleBackward": "dropout", "NativeDropoutBackward0": "dropout", "GeluBackward0": "GELU",
            "NativeLayerNormBackward0": "LayerNorm", "AddBackward0": "residual adds",
            "EmbeddingBackward0": "embeddings, positions, pooling, loss",
            "NllLossBackward0": "embeddings, positions, pooling, loss",
            "LogSoftmaxBackward0": "embeddings, positions, pooling, loss", "ReluBackward0": "Linear layers",
            "torch::autograd::AccumulateGrad": "optimizer"}


def _module_part(name: str) -> str:
    """The part of a module's own (self) forward time, from its qualified name."""
    leaf = name.split(".")[-1]
    if name.startswith("head"):
        return "Linear layers"
    if leaf in ("W_q", "W_k", "W_v", "ff") or (".mlp." in name and leaf in ("0", "3")):
        return "Linear layers"
    if leaf == "drop" or (".mlp." in name and leaf in ("2", "4")):
        return "dropout"
    if ".mlp." in name and leaf == "1":
        return "GELU"
    if leaf.startswith("norm"):
        return "LayerNorm"
    if leaf == "attn":
        return "attention core"
    if name.startswith("encoder.blocks."):
        return "residual adds"  # a block's own ops: the two residual adds
    return "embeddings, positions, pooling, loss"


def _label_forwards(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if not name or name in ("encoder.blocks", "head") or name.endswith(".mlp"):
            continue

        def enter(mod, args, name=name):
            mod._profile_range = record_function(f"module:{name}")
            mod._profile_range.__enter__()

        def leave(mod, args, out):
            mod._profile_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _part(event) -> str:
    node = event
    while node is not None:
        if node.name.startswith("module:"):
            return _module_part(node.name.removeprefix("module:"))
        if node.name.startswith("autograd::engine::evaluate_function: "):
            return BACKWARD.get(node.name.split(": ", 1)[1], "attention core")
        if node.name.startswith("Optimizer."):
            return "optimizer"
        node = node.cpu_parent
    return "embeddings, positions, pooling, loss"  # top level: the loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn", action="append", help="registry attention NAME[:key=value,...] (repeatable); "
                                                        "default: softmax and soft:num_landmarks=64")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--ops", type=int, default=0, help="also print torch's table of this many ops by self time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelBenchConfig(lengths=(args.n,), batch=args.batch)
    for spec in parse_specs(args.attn or ["softmax", "soft:num_landmarks=64"], []):
        trainer = _lra_trainer(spec, args.n, cfg, torch.device("cpu"))
        _label_forwards(trainer.model)
        trainer.step(), trainer.step()  # warm-up; the first also allocates AdamW's state
        start = time.perf_counter()
        trainer.step()
        unprofiled = time.perf_counter() - start
        with profile() as prof:
            trainer.step()
        parts = collections.Counter()
        for event in prof.events():
            parts[_part(event)] += event.self_cpu_time_total
        total = sum(parts.values())
        print(f"\n{spec.label}: n {args.n}, batch {args.batch}, {torch.get_num_threads()} threads; one step "
              f"{unprofiled * 1e3:.0f} ms unprofiled, {total / 1e3:.0f} ms of self time profiled")
        print("| part of the step | ms | share |\n|---|---|---|")
        for part in PARTS:
            print(f"| {part} | {parts[part] / 1e3:.1f} | {parts[part] / total:.0%} |")
        if args.ops:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
