"""`dyn worker --config F [--config G ...]` (internal: the planner daemon launches it)."""

from __future__ import annotations

import typer

from dyn.cli.process import run_process, run_processes


def worker(config: list[str] = typer.Option(..., "--config",
                                            help="ProcessConfig JSON written by the daemon; several: mock "
                                                 "workers hosted by one process (model.mock_workers_per_process).")
           ) -> None:
    """Run one inference worker, or several mock workers in one process (launched by `dyn up`;
    not for direct use).

    Example: dyn worker --config ~/.local/state/dyn/demo/run/decode-0.json
    """
    if len(config) == 1:
        from dyn.worker.process import WorkerProcess

        run_process(config[0], lambda cfg: WorkerProcess(cfg).run())
        return
    from dyn.worker.host import check_hosted, run_hosted

    run_processes(config, run_hosted, check=check_hosted)


def register(app: typer.Typer) -> None:
    app.command("worker", hidden=True)(worker)
