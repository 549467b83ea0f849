"""`dyn up`: bring a deployment up and show each process coming ready."""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import Iterator, Optional

import typer

from dyn.cli.render import errors_to_exit


def up(
    topology: Optional[str] = typer.Option(None, "-t", "--topology",
                                           help="Topology file or shipped name (default: local)."),
    recipe: Optional[str] = typer.Option(None, "-r", "--recipe",
                                         help="Recipe file or shipped name (default: smollm2-local)."),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: the recipe's name)."),
    accept_new_host_keys: bool = typer.Option(False, "--accept-new-host-keys",
                                              help="Trust and record unknown SSH host keys."),
    dyn_command: Optional[str] = typer.Option(None, "--dyn-command",
                                              help="How to run dyn on the nodes (default: this dyn "
                                                   "locally, `dyn` on remote nodes)."),
    router: Optional[str] = typer.Option(None, "--router", help="Router policy override (kv, round-robin, "
                                                                "least-loaded, random)."),
    keep_partial: bool = typer.Option(False, "--keep-partial",
                                      help="On failure, leave what started for inspection."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Replace a running deployment whose files changed."),
    node_state_dir: Optional[str] = typer.Option(None, "--node-state-dir", envvar="DYN_NODE_STATE_DIR",
                                                 help="Run-dir root on every node (default: "
                                                      "~/.local/state/dyn there)."),
    slurm: bool = typer.Option(False, "--slurm", help="Run inside the current Slurm allocation: workers are "
                                                      "srun job steps (default topology: one written for "
                                                      "the allocation, as `dyn topo from-slurm` does)."),
    wait: bool = typer.Option(False, "--wait", help="Stay until the deployment ends (last line of an sbatch "
                                                    "script); SIGTERM/SIGINT take it down first."),
    timeouts: Optional[str] = typer.Option(
        None, "--timeouts", envvar="DYN_TIMEOUTS",
        help="Daemon deadlines in seconds, e.g. load_s=1800 for a model slow to load: register_s (launch "
             "to register, default 120), load_s (register to ready, 900), heartbeat_s (6), stop_s (20)."),
) -> None:
    """Start a deployment and wait until every process is ready.

    Example: dyn up -t topologies/local.yaml -r recipes/tiny-local.yaml
    Inside salloc/sbatch: dyn up --slurm -r recipes/mock-local.yaml
    """
    from rich.console import Console
    from rich.live import Live

    from dyn.cli.status import progress_table
    from dyn.deploy.bringup import UpOptions, up as run_up

    console = Console(stderr=True)
    options = UpOptions(topology_path=topology, recipe_path=recipe, name=name,
                        accept_new_host_keys=accept_new_host_keys,
                        dyn_command=tuple(shlex.split(dyn_command)) if dyn_command else None,
                        router_policy=router, keep_partial=keep_partial, assume_yes=yes,
                        node_state_root=node_state_dir, timeouts=_timeouts(timeouts), slurm=slurm)
    live = Live(console=console, transient=False, auto_refresh=False)
    with errors_to_exit(), _line_after(console), live:  # the live table stops before the error prints
        result = run_up(options, on_progress=lambda s: live.update(progress_table(s, max_rows=16), refresh=True),
                        confirm=lambda q: _ask(live, q))
    urls = result.status.get("frontend_urls") or [result.frontend_url]
    frontends = f"Frontend{'s' if len(urls) > 1 else ''}: {' '.join(urls)}"
    if result.already_running:
        typer.echo(f"deployment {result.name!r} is already running with these files; nothing changed. {frontends}")
    elif result.adopted is not None:
        typer.echo(f"deployment {result.name!r}: daemon restarted; {result.adopted} running processes adopted. "
                   f"{frontends}")
    else:
        typer.echo(f"deployment {result.name!r} ready in {result.elapsed_s:.1f} s. {frontends}")
    if wait:
        _hold(result.name)


@contextlib.contextmanager
def _line_after(console) -> Iterator[None]:
    """End the live table's last line where the console is not a terminal (a log file, a pipe):
    there it renders once, when it stops, and leaves the line open for what comes next."""
    try:
        yield
    finally:
        if not console.is_terminal:
            console.line()


def _hold(name: str) -> None:
    """--wait: block until the deployment ends; a signal only sets the flag (the library takes it down)."""
    import signal
    import threading

    from dyn.deploy.hold import hold

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    result = hold(name, stop)
    typer.echo(f"deployment {name!r}: {result.how} ({result.detail})"
               + (f"; daemon restarted {result.num_daemon_restarts}x" if result.num_daemon_restarts else ""))
    if result.how in ("ended", "failed"):
        raise typer.Exit(1)


def _timeouts(text: str | None) -> dict[str, float]:
    overrides: dict[str, float] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"expected key=seconds, got {item!r}", param_hint="--timeouts")
    return overrides


def _ask(live, question: str) -> bool:
    if not sys.stdin.isatty():  # scripts get a clear refusal, not a prompt that reads EOF
        return False
    live.stop()
    return typer.confirm(question, default=False)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
