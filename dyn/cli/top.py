"""`dyn top`: a live view of a deployment (workers, GPUs, KV, latencies, planner, errors)."""

from __future__ import annotations

import asyncio
from typing import Optional

import typer

from dyn.cli.render import errors_to_exit


def top(
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one)."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    interval_s: float = typer.Option(1.0, "--interval", min=0.2, help="Seconds between refreshes."),
) -> None:
    """Watch a deployment live: q quits, arrows/tab select, enter shows a worker, esc goes back.

    Without a terminal it prints a plain table every interval.
    Example: dyn top --name mock-local
    """
    from rich.console import Console

    from dyn.dashboard.app import run_top
    from dyn.deploy.inspect import resolve_name

    try:
        with errors_to_exit():
            asyncio.run(run_top(resolve_name(name), Console(highlight=False), interval_s=interval_s, once=once))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    app.command("top")(top)
