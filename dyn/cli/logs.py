"""`dyn logs`: a process's log, fetched over SSH when it runs on another node."""

from __future__ import annotations

import asyncio
import sys
from typing import Optional

import typer

from dyn.cli.render import errors_to_exit, fail


def logs(
    process: Optional[str] = typer.Argument(None, help="Process id (e.g. decode-0, frontend) or 'daemon'."),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one)."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing what the process appends."),
    lines: int = typer.Option(50, "-n", "--lines", min=1, help="How many last lines to show first."),
    request: Optional[str] = typer.Option(None, "--request", help="Follow one request id across every "
                                          "process's log (frontend, prefill, shuttle, decode), in time order."),
) -> None:
    """Print the end of a process's log, or one request's lines from every log.

    Example: dyn logs decode-0 -f;  dyn logs --request my-req-42
    """
    from dyn.deploy.inspect import log_chunks, resolve_name

    if request is not None:  # issue 8: --request
        if process is not None or follow:
            fail("--request reads every process's log; drop the process id and -f", exit_code=2)
        _follow_request(name, request)
        return
    if process is None:
        fail("give a process id (see `dyn status`) or --request ID", exit_code=2)

    async def pump(chosen: str) -> None:
        async for chunk in log_chunks(chosen, process, num_lines=lines, follow=follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        with errors_to_exit():
            asyncio.run(pump(resolve_name(name)))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _follow_request(name: Optional[str], request_id: str) -> None:
    from dyn.dashboard.trace import follow_request
    from dyn.deploy.inspect import resolve_name

    with errors_to_exit():
        for line in asyncio.run(follow_request(resolve_name(name), request_id)):
            typer.echo(line.render())


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
