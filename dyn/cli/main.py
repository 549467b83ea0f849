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


from dyn.cli import worker as _worker_cmd  # noqa: E402

_worker_cmd.register(app)


def main() -> None:
    app()
