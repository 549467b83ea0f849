"""Non-blocking keyboard input for `dyn top`: cbreak mode on a TTY, keys into an asyncio queue.

Only used when stdin is a terminal; the terminal mode is restored on exit
whatever happens, so a crash never leaves the operator's shell without echo.
"""

from __future__ import annotations

import asyncio
import os
import sys
import termios
import tty

_SEQUENCES = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[5~": "pgup", "\x1b[6~": "pgdn", "\x1b[H": "home",
              "\x1b[F": "end", "\x1b[Z": "backtab", "\x1bOA": "up", "\x1bOB": "down"}
_SINGLE = {"\t": "tab", "\r": "enter", "\n": "enter", "\x1b": "esc", "\x03": "q", "\x7f": "esc"}


def parse_keys(data: str) -> list[str]:
    """Raw terminal input -> key names ("q", "up", "enter", ...); unknown bytes become themselves."""
    keys, i = [], 0
    while i < len(data):
        for seq, name in _SEQUENCES.items():
            if data.startswith(seq, i):
                keys.append(name)
                i += len(seq)
                break
        else:
            ch = data[i]
            keys.append(_SINGLE.get(ch, ch))
            i += 1
    return keys


class KeyReader:
    """`async with KeyReader() as keys: await keys.get()`; inert (never yields) without a TTY."""

    def __init__(self, stream=None) -> None:
        self._stream = stream or sys.stdin
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._saved = None
        self._fd = -1

    @property
    def is_active(self) -> bool:
        return self._saved is not None

    async def __aenter__(self) -> "KeyReader":
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            return self
        if not os.isatty(fd):
            return self
        self._fd, self._saved = fd, termios.tcgetattr(fd)
        tty.setcbreak(fd)
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._saved is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64).decode(errors="replace")
        except OSError:
            return
        for key in parse_keys(data):
            self.queue.put_nowait(key)
