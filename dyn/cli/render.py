"""Shared CLI rendering: consoles, JSON output, and DynError -> exit code.

Commands wrap their one library call in `errors_to_exit()`: a DynError
becomes `error: <message>` on stderr and the error's exit code (2 for a bad
file or a recipe that does not fit), never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from dyn.errors import DynError


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn a DynError into a clean message on stderr and its exit code."""
    try:
        yield
    except DynError as exc:
        fail(exc)


def fail(exc: DynError) -> None:
    err().print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(exc.exit_code) from None


def print_json(data: Any) -> None:
    """Machine output: plain JSON on stdout, no colour or wrapping."""
    typer.echo(json.dumps(data, indent=2))


def index_ranges(values: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 3, 6] -> "0-3,6": short GPU lists for tables."""
    parts: list[str] = []
    items = sorted(values)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
