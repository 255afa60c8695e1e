"""lra-soft command line: a thin Typer layer over ``lra_soft`` and ``tasks``.

    python cli.py --help
"""
from __future__ import annotations

import typer

from lra_soft.attention import ATTENTION

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


@app.command()
def attentions() -> None:
    """List the registered attentions, one line each."""
    for name, cls in ATTENTION.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<10} {doc}")


if __name__ == "__main__":
    app()
