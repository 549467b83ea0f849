"""`dyn ls`: deployments known in the state directory."""

from __future__ import annotations

import json
import time

import typer


def ls(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List deployments in the state directory ($DYN_STATE_DIR).

    Example: dyn ls
    """
    from rich.console import Console
    from rich.table import Table

    from dyn.dashboard.render import print_whole
    from dyn.deploy.inspect import list_all

    rows = list_all()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no deployments")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("name", "state", "processes", "frontend", "recipe", "age"):
        # a URL or path cut short with an ellipsis is no use: fold it onto the next line instead
        table.add_column(column, overflow="fold" if column in ("frontend", "recipe") else "ellipsis")
    for r in rows:
        age = time.time() - r.get("created_at", time.time())
        table.add_row(r["name"], r["state"], str(r.get("num_processes", "-")), r.get("frontend_url", ""),
                      r.get("recipe", ""), f"{age / 60:.0f} min")
    print_whole(Console(), table)


def register(app: typer.Typer) -> None:
    app.command("ls")(ls)
