"""`dyn worker --config F` (internal: the planner daemon launches it)."""

from __future__ import annotations

import asyncio

import typer

from dyn.config.process import ProcessConfig
from dyn.errors import DynError


def worker(config: str = typer.Option(..., "--config", help="ProcessConfig JSON written by the daemon.")) -> None:
    """Run one inference worker (launched by `dyn up`; not for direct use).

    Example: dyn worker --config ~/.local/state/dyn/demo/run/decode-0.json
    """
    from dyn.logs import setup_process_logging
    from dyn.worker.process import WorkerProcess

    try:
        cfg = ProcessConfig.load(config)
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_process_logging(cfg.deployment, cfg.process_id)
    _use_uvloop()
    raise typer.Exit(asyncio.run(WorkerProcess(cfg).run()))


def register(app: typer.Typer) -> None:
    app.command("worker", hidden=True)(worker)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
