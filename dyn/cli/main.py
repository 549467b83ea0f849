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
from dyn.cli import topo as _topo_cmd, plan as _plan_cmd  # noqa: E402
_topo_cmd.register(app); _plan_cmd.register(app)  # noqa: E702
from dyn.cli import frontend as _frontend_cmd  # noqa: E402
_frontend_cmd.register(app)
from dyn.cli import model as _model_cmd  # noqa: E402
app.add_typer(_model_cmd.app, name="model")

from dyn.cli import up as _up_cmd, down as _down_cmd, status as _status_cmd, logs as _logs_cmd, ls as _ls_cmd, internal as _internal_cmd  # noqa: E402,E501
for _cmd in (_up_cmd, _down_cmd, _status_cmd, _logs_cmd, _ls_cmd, _internal_cmd): _cmd.register(app)  # noqa: E701
from dyn.cli import sim as _sim_cmd, profile as _profile_cmd  # noqa: E402
_sim_cmd.register(app); _profile_cmd.register(app)  # noqa: E702
from dyn.cli import top as _top_cmd; _top_cmd.register(app)  # noqa: E402,E702
from dyn.cli import bench as _bench_cmd; _bench_cmd.register(app)  # noqa: E402,E702

def main() -> None:
    app()


if __name__ == "__main__":
    main()
