"""The `dyn` command: one typer app; subcommands register themselves here."""

from __future__ import annotations

import typer

from dyn import __version__

app = typer.Typer(
    name="dyn",
    help="Inference orchestrator for bare-metal GPU racks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dyn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """dyn: disaggregated LLM serving on bare-metal racks, without Kubernetes."""


# Commands register themselves in help order: operator commands first, internal ones hidden.
from dyn.cli import (bench, doctor, down, frontend, internal, logs, ls, model, plan, profile,  # noqa: E402
                     sim, status, top, topo, trace, up, worker)

for _command in (up, status, top, logs, down, ls, doctor, bench, sim, profile, topo, plan, worker, frontend,
                 internal):
    _command.register(app)
app.add_typer(model.app, name="model")
app.add_typer(trace.app, name="trace")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
