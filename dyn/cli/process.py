"""Shared start-up of the internal process commands (`dyn worker`, `dyn frontend`)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import typer

from dyn.config.process import ProcessConfig
from dyn.errors import DynError


def run_process(config_path: str, main: Callable[[ProcessConfig], Awaitable[int]]) -> None:
    """Load the daemon-written config, log JSON lines, run `main` under uvloop, exit with its code."""
    from dyn.logs import setup_process_logging

    try:
        cfg = ProcessConfig.load(config_path)
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_process_logging(cfg.deployment, cfg.process_id)
    _use_uvloop()
    try:
        code = asyncio.run(main(cfg))
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
