"""Shared CLI rendering: consoles, JSON output, and DynError -> exit code.

Every command wraps its library calls in `errors_to_exit()`: a DynError
becomes `error: <message>` on stderr and the error's exit code (2 for a bad
file or a recipe that does not fit), never a traceback. This is the only
place that renders an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from dyn.errors import DynError


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def errors_to_exit(*also: type[Exception], exit_code: int | None = None) -> Iterator[None]:
    """Turn a DynError (or one of `also`, e.g. OSError) into `error: <message>` on stderr and an
    exit code: `exit_code` when given, else the error's own (1 for the `also` kinds)."""
    try:
        yield
    except DynError as exc:
        fail(exc, exit_code)
    except also as exc:
        fail(exc, 1 if exit_code is None else exit_code)


def fail(error: Exception | str, exit_code: int | None = None) -> NoReturn:
    """Print `error: <message>` on stderr and exit: `exit_code`, else the error's own, else 1.
    A plain string is a usage error (pass exit_code=2)."""
    err().print(f"[bold red]error:[/] {escape(str(error))}")
    raise typer.Exit(getattr(error, "exit_code", 1) if exit_code is None else exit_code) from None


def print_json(data: Any) -> None:
    """Machine output: plain JSON on stdout, no colour or wrapping."""
    typer.echo(json.dumps(data, indent=2))
