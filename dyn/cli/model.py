"""`dyn model ...`: model utilities (a tiny random checkpoint for demos and tests)."""

from __future__ import annotations

import typer

from dyn.cli.render import errors_to_exit, fail

app = typer.Typer(help="Model utilities.", no_args_is_help=True)


@app.command("init")
def init(kind: str = typer.Argument(..., help="What to create; only 'tiny' for now."),
         directory: str = typer.Argument(..., help="Output directory (created if absent)."),
         seed: int = typer.Option(0, "--seed", help="Weight seed; the same seed gives identical files.")) -> None:
    """Write a random-weight Llama checkpoint in Hugging Face format.

    Example: dyn model init tiny ./models/tiny --seed 1
    """
    if kind != "tiny":
        fail(f"unknown model kind {kind!r}; only 'tiny' is available", exit_code=2)
    from dyn.engine.tiny import write_tiny_checkpoint

    with errors_to_exit(OSError, exit_code=1):
        out = write_tiny_checkpoint(directory, seed)
    typer.echo(f"wrote tiny Llama checkpoint (seed {seed}) to {out}")
