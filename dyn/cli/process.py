"""Shared start-up of the internal process commands (`dyn worker`, `dyn frontend`)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import typer

from dyn.cli.render import errors_to_exit
from dyn.config.process import ProcessConfig


def run_process(config_path: str, main: Callable[[ProcessConfig], Awaitable[int]]) -> None:
    """Load the daemon-written config, log JSON lines, run `main` under uvloop, exit with its code."""
    from dyn.logs import setup_process_logging

    with errors_to_exit(exit_code=2):
        cfg = ProcessConfig.load(config_path)
    setup_process_logging(cfg.deployment, cfg.process_id)
    _use_uvloop()
    with errors_to_exit():
        code = asyncio.run(main(cfg))
    raise typer.Exit(code)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
