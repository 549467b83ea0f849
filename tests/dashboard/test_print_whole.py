"""Tables printed where output is not a terminal (a pipe, a log, ssh without a tty) keep every cell whole."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from dyn.dashboard.render import print_whole

ROW = ("smollm2-vllm-local", "running", "http://10.0.0.17:8000", "recipes/smollm2-vllm-local.yaml", "prefill-0",
       "decode-12", "a-tray17:0-3")


def _table() -> Table:
    table = Table(box=None, pad_edge=False)
    for i in range(len(ROW)):
        table.add_column(f"column {i}", no_wrap=True)
    table.add_row(*ROW)
    return table


def test_a_pipe_gets_every_cell_whole_and_the_console_keeps_its_width():
    console = Console(file=io.StringIO(), width=80)
    assert not console.is_terminal
    print_whole(console, _table())
    text = console.file.getvalue()
    assert "…" not in text and all(cell in text for cell in ROW), text
    assert max(len(line.rstrip()) for line in text.splitlines()) > 80
    assert console.width == 80


def test_a_terminal_keeps_its_width():
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    print_whole(console, _table())
    assert max(len(line) for line in console.file.getvalue().splitlines()) <= 80
