"""`dyn down`: stop every process of a deployment and remove its state."""

from __future__ import annotations

from typing import Optional

import typer

from dyn.cli.render import errors_to_exit


def down(
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one)."),
    force: bool = typer.Option(False, "--force", help="Kill from the state file over SSH, without the daemon."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to let processes drain before killing them."),
) -> None:
    """Drain and stop a deployment; a second `down` is a no-op.

    Example: dyn down --name smollm2-local
    """
    from dyn.deploy.inspect import resolve_name
    from dyn.deploy.teardown import down as run_down

    with errors_to_exit():
        chosen = resolve_name(name, missing_ok=True)
        if chosen is None:
            typer.echo("nothing is running: no deployments in the state directory")
            return
        result = run_down(chosen, force=force, timeout_s=timeout)
    if not result.was_running:
        typer.echo(f"nothing is running under the name {chosen!r}")
        return
    how = f" (killed {result.num_killed} leftover processes)" if result.num_killed else ""
    typer.echo(f"deployment {chosen!r} stopped and removed{how}")


def register(app: typer.Typer) -> None:
    app.command("down")(down)
