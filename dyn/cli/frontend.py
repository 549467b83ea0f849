"""`dyn frontend --config F` (internal: the planner daemon launches it)."""

from __future__ import annotations

import typer

from dyn.cli.process import run_process


def frontend(config: str = typer.Option(..., "--config", help="ProcessConfig JSON written by the daemon.")) -> None:
    """Run the OpenAI-compatible HTTP frontend (launched by `dyn up`; not for direct use).

    Example: dyn frontend --config ~/.local/state/dyn/demo/run/frontend.json
    """
    from dyn.frontend.process import run_frontend

    run_process(config, run_frontend)


def register(app: typer.Typer) -> None:
    app.command("frontend", hidden=True)(frontend)
