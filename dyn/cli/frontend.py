"""`dyn frontend --config F` (internal: the planner daemon launches it)."""

from __future__ import annotations

import asyncio

import typer

from dyn.config.process import ProcessConfig
from dyn.errors import DynError


def frontend(config: str = typer.Option(..., "--config", help="ProcessConfig JSON written by the daemon.")) -> None:
    """Run the OpenAI-compatible HTTP frontend (launched by `dyn up`; not for direct use).

    Example: dyn frontend --config ~/.local/state/dyn/demo/run/frontend.json
    """
    from dyn.frontend.process import run_frontend
    from dyn.logs import setup_process_logging

    try:
        cfg = ProcessConfig.load(config)
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_process_logging(cfg.deployment, cfg.process_id)
    _use_uvloop()
    try:
        code = asyncio.run(run_frontend(cfg))
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("frontend", hidden=True)(frontend)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
