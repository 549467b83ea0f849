"""One tool call's JSON read as the model writes it: the name as soon as it is complete, then the
arguments piece by piece, in OpenAI's streamed shape (a call's first delta has its id, type and
name with empty arguments; later ones add to the arguments), as vLLM's tool parsers stream them.

Only the shape the Hermes and Llama 3.1 templates ask for streams: an object whose first key is
"name" and whose next is "arguments" (Llama: "parameters") holding an object. A call written any
other way is left to the whole-answer parse at the end and comes whole, as before. The arguments
go out as the model wrote them (vLLM streams them raw too); the answer's final parse, which a
non-streamed response returns, writes them normalized.
"""

from __future__ import annotations

import json
import os
from typing import Callable

MAX_HEAD_CHARS = 512
"""A call whose name and arguments key have not come within this many characters is not streamed."""
_SPACE = " \t\r\n"


def new_call_id() -> str:
    return f"call_{os.urandom(12).hex()}"


class CallStream:
    """The call whose JSON object starts at `start` in a growing text (the answer from its first
    call on); `advance(text)` returns the deltas the text added since the last call."""

    def __init__(self, start: int, index: int) -> None:
        self.start = start
        self.index = index
        self.id = new_call_id()
        self.name: str | None = None
        """Set once the header (id, type, name) went out."""
        self.arguments_done = False
        self.failed = False
        """Not the usual shape: nothing of it streams; the final parse sends it whole."""
        self.end: int | None = None
        """Where the object ends (after its closing brace), once written."""
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._escape = False

    def advance(self, text: str) -> list[dict]:
        if self.failed or self.end is not None:
            return []
        deltas: list[dict] = []
        if self.name is None:
            head = _head(text, self.start)
            if head is None:
                self.failed = len(text) - self.start > MAX_HEAD_CHARS
                return deltas
            if head is False:
                self.failed = True
                return deltas
            self.name, self._pos = head
            self._depth = 1  # inside the call's object, at the arguments' opening brace
            deltas.append({"index": self.index, "id": self.id, "type": "function",
                           "function": {"name": self.name, "arguments": ""}})
        start = self._pos
        arguments_end = self._scan(text)
        if arguments_end > start:
            deltas.append({"index": self.index, "function": {"arguments": text[start:arguments_end]}})
        return deltas

    def _scan(self, text: str) -> int:
        """Scan from where the last call stopped; returns where the arguments' text ends so far."""
        depth, in_string, escape = self._depth, self._in_string, self._escape
        pos, arguments_end = self._pos, self._pos
        while pos < len(text):
            char = text[pos]
            pos += 1
            if in_string:
                if escape:
                    escape = False
                elif char == "\\":
                    escape = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 1 and not self.arguments_done:
                    self.arguments_done = True
                    arguments_end = pos
                elif depth == 0:
                    self.end = pos
                    break
            if not self.arguments_done:
                arguments_end = pos
        self._pos, self._depth, self._in_string, self._escape = pos, depth, in_string, escape
        return arguments_end


def advance_calls(text: str, streams: list[CallStream], next_call: Callable[[str, int], int | None]) -> list[dict]:
    """The deltas `text` added to its calls, one call after another: `streams` grows by a call
    once `next_call(text, where the last one ended, or 0)` finds where the next one starts."""
    deltas: list[dict] = []
    while True:
        current = streams[-1] if streams else None
        if current is not None:
            deltas += current.advance(text)
            if current.end is None:  # (not written whole yet, or not streamable: what follows waits)
                return deltas
        start = next_call(text, current.end if current is not None else 0)
        if start is None:
            return deltas
        streams.append(CallStream(start, len(streams)))


def _head(text: str, pos: int) -> tuple[str, int] | bool | None:
    """`{"name": "<name>", "arguments": ` up to the arguments' `{`: (name, where that brace is);
    None while the text may still become that; False when it cannot."""
    for expected in ("{", '"name"', ":", '"'):
        pos = skip_space(text, pos)
        found = _literal(text, pos, (expected,))
        if found is None or found is False:  # (False is an int too)
            return found
        pos = found
    name_end = _string_end(text, pos)
    if name_end is None:
        return None
    try:
        name = json.loads(text[pos - 1:name_end])
    except ValueError:
        return False
    pos = name_end
    for expected in ((",",), ('"arguments"', '"parameters"'), (":",), ("{",)):
        pos = skip_space(text, pos)
        found = _literal(text, pos, expected)
        if found is None or found is False:  # (False is an int too)
            return found
        pos = found
    return (name, pos - 1) if name else False


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _literal(text: str, pos: int, options: tuple[str, ...]) -> int | bool | None:
    """Where one of `options` written at `pos` ends; None: too little text yet; False: none is."""
    maybe = False
    for option in options:
        if text.startswith(option, pos):
            return pos + len(option)
        maybe = maybe or option.startswith(text[pos:])
    return None if maybe else False


def _string_end(text: str, pos: int) -> int | None:
    """After the closing quote of the JSON string whose text starts at `pos`; None: not yet closed."""
    escape = False
    for i in range(pos, len(text)):
        char = text[i]
        if escape:
            escape = False
        elif char == "\\":
            escape = True
        elif char == '"':
            return i + 1
    return None
