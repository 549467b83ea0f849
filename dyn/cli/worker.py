"""`dyn worker --config F` (internal: the planner daemon launches it)."""

from __future__ import annotations

import typer

from dyn.cli.process import run_process


def worker(config: str = typer.Option(..., "--config", help="ProcessConfig JSON written by the daemon.")) -> None:
    """Run one inference worker (launched by `dyn up`; not for direct use).

    Example: dyn worker --config ~/.local/state/dyn/demo/run/decode-0.json
    """
    from dyn.worker.process import WorkerProcess

    run_process(config, lambda cfg: WorkerProcess(cfg).run())


def register(app: typer.Typer) -> None:
    app.command("worker", hidden=True)(worker)
