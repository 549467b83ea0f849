"""`dyn planner --config F` (internal: `dyn up` starts it on the head node)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from dyn.cli.render import errors_to_exit


def planner(config: str = typer.Option(..., "--config", help="The deployment.json written by `dyn up`.")) -> None:
    """Run a deployment's planner daemon (started by `dyn up`; not for direct use).

    Example: dyn planner --config ~/.local/state/dyn/demo/deployment.json
    """
    from dyn.logs import setup_process_logging
    from dyn.planner.daemon import PlannerDaemon
    from dyn.planner.state import StateStore

    path = Path(config).expanduser().resolve()
    with errors_to_exit(exit_code=2):
        store = StateStore(path.parent.name, root=path.parent.parent)
        daemon = PlannerDaemon(store)
    setup_process_logging(store.name, "daemon")
    # Default asyncio loop, not uvloop: under uvloop, with 18 SSH connections busy, the local
    # runner's start of the frontend hung until its 15 s timeout although the frontend had started
    # (seen 3 times in scripts/bench_bringup.py, never without uvloop). The daemon is not hot.
    with errors_to_exit(exit_code=1):
        code = asyncio.run(daemon.run())
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("planner", hidden=True)(planner)
