"""Shared start-up of the internal process commands (`dyn worker`, `dyn frontend`)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import typer

from dyn.cli.render import errors_to_exit
from dyn.config.process import ProcessConfig


def run_process(config_path: str, main: Callable[[ProcessConfig], Awaitable[int]]) -> None:
    """Load the daemon-written config, log JSON lines, run `main` under uvloop, exit with its code."""
    run_processes([config_path], lambda configs: main(configs[0]))


def run_processes(config_paths: list[str], main: Callable[[list[ProcessConfig]], Awaitable[int]], *,
                  check: Callable[[list[ProcessConfig]], None] | None = None) -> None:
    """run_process for a process that hosts several (the first config's log is the process's own
    output; every other one's lines go to its own log_path)."""
    from dyn.logs import dump_stacks_on_signal, setup_process_logging

    with errors_to_exit(exit_code=2):
        configs = [ProcessConfig.load(path) for path in config_paths]
        if check is not None:
            check(configs)
    first = configs[0]
    setup_process_logging(first.deployment, first.process_id,
                          hosted_logs={cfg.process_id: cfg.log_path for cfg in configs[1:]})
    dump_stacks_on_signal()
    _use_uvloop()
    with errors_to_exit():
        code = asyncio.run(main(configs))
    raise typer.Exit(code)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
