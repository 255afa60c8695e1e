"""lra-soft command line: a thin Typer layer over ``lra_soft`` and ``tasks``.

    python cli.py --help
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lra_soft.attention import ATTENTION

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def attentions() -> None:
    """List the registered attentions, one line each."""
    for name, cls in ATTENTION.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<10} {doc}")


@app.command()
def bench(
    attn: Annotated[list[str], typer.Option(help="Attention NAME or NAME:key=value,... (repeatable) [soft, softmax].")
                    ] = [],
    option: Annotated[list[str], typer.Option("--option", "-o", help="key=value for every chosen attention that "
                                                                      "takes it (repeatable).")] = [],
    lengths: Annotated[Optional[str], typer.Option(help="Comma-separated n; imagenet: image sizes "
                                                        "[1024,2048,4096; lra 2048; imagenet 224].")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size [8; lra 32; imagenet 8].")] = None,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dimension (model width = heads x head_dim).")] = 32,
    dtype: Annotated[str, typer.Option(help="float32 | float64 | bfloat16 | float16 (inputs and parameters).")
                     ] = "float32",
    autocast: Annotated[str, typer.Option(help="none | bfloat16 | float16 (torch.autocast, GPU mixed precision).")
                        ] = "none",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    mask: Annotated[bool, typer.Option(help="Pass a padding mask (lengths n down to about n/2).")] = False,
    warmup: Annotated[int, typer.Option(help="Untimed calls per case.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed calls per case (median and quartiles reported).")] = 5,
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile'd attentions/models.")] = False,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend.")] = "inductor",
    memory: Annotated[bool, typer.Option(help="Measure peak memory.")] = True,
    flops: Annotated[bool, typer.Option(help="Count forward+backward FLOPs (attention mode).")] = True,
    floors: Annotated[bool, typer.Option(help="Measure the matmul rate and SOFT's Newton-product floor.")] = True,
    matmul_size: Annotated[int, typer.Option(help="Side of the square matmul that measures the machine's rate.")
                           ] = 2048,
    model: Annotated[str, typer.Option(help="none (attention module) | lra (encoder, tokens/s) | imagenet "
                                            "(backbones, images/s).")] = "none",
    depth: Annotated[int, typer.Option(help="lra: encoder layers.")] = 2,
    mlp_dim: Annotated[Optional[int], typer.Option(help="lra: feed-forward width [2 x width].")] = None,
    variant: Annotated[list[str], typer.Option(help="imagenet: backbone (repeatable) [soft_tiny].")] = [],
    preset: Annotated[Optional[str], typer.Option(help="fig1b: the paper's Figure 1b protocol (12 layers, d 384, "
                                                       "h 12, m 49, batch 1, n = 784 p); flags above override.")
                      ] = None,
    out: Annotated[Path, typer.Option(help="Directory for NAME.{json,csv,md,png}.")] = Path("runs/bench"),
    name: Annotated[str, typer.Option(help="File stem of the outputs.")] = "bench",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Time, peak memory and FLOPs of attentions (or whole models) against sequence length; table, JSON, CSV, plot."""
    import shlex
    import sys

    from tqdm import tqdm

    from lra_soft import bench as B

    try:
        if preset not in (None, "fig1b"):
            raise ValueError(f"--preset {preset!r} unknown; the one preset is fig1b")
        if preset:
            model, heads, depth = "lra", 12, 12
            attn = attn or list(name for name in B.FIG1B_ATTENTIONS if name.split(":")[0] in ATTENTION)
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
        command = "python cli.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        result["command"] = command
        paths = B.save(result, out, name, command=command)
    except ValueError as e:
        _fail(e)
    typer.echo(B.markdown_table(result))
    typer.echo("written: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    app()
