"""A chat answer's tool calls, read out of the model's text (recipe model.tool_call_parser).

Models call tools by writing them in their own format: Hermes-style templates (Qwen2.5,
Qwen3, Hermes, many fine-tunes) wrap each call's JSON in `<tool_call>...</tool_call>`;
Llama 3.1/3.2 answer a bare `{"name": ..., "parameters": {...}}` (several joined by `;`).
vLLM's `--tool-call-parser hermes|llama3_json` return them as OpenAI `tool_calls`, and so
does dyn, with the same rule for what is not a call: text that does not parse stays content.

Streamed, content passes through until a call may begin (a tail that could still become
`<tool_call>` is held back); from there each call streams as the model writes it: its id and
name, then its arguments piece by piece (dyn.frontend.call_stream). The held text is parsed
whole when the answer ends, as without streaming: that parse decides the answer's calls, and
a call that did not stream (not written in the usual shape) comes whole then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from dyn.config.recipe import ToolCallParser
from dyn.frontend.call_stream import CallStream, advance_calls, new_call_id, skip_space
from dyn.frontend.reasoning import ReasoningSplitter, Split, partial_marker

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text, as OpenAI returns them."""
    id: str

    def as_dict(self, index: int | None = None) -> dict:
        """OpenAI's tool call object (with `index`: a streamed delta's)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tool_calls(parser: ToolCallParser, text: str) -> tuple[str, list[ToolCall]]:
    """The content and the calls of a whole answer; ([text], []) when it holds no call that parses."""
    if parser == "hermes":
        return _hermes(text)
    if parser == "llama3_json":
        return _llama3_json(text)
    return text, []


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    rest = text[start:]
    while rest.startswith(HERMES_START):
        body, end, rest = rest[len(HERMES_START):].partition(HERMES_END)
        call = _call(body.strip())
        if call is None:
            return text, []
        calls.append(call)
        rest = rest.lstrip()
        if not end:  # the last call's closing tag cut off (max_tokens): what parsed still counts
            break
    if rest:  # text after the calls that is not a call: not a tool-call answer
        return text, []
    before = text[:start]  # (kept as written, as vLLM's hermes parser keeps it; blank: none)
    return before if before.strip() else "", calls


def _llama3_json(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].lstrip()
    if not body.startswith("{"):
        return text, []
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, pos = _decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _from_object(obj)
        if call is None:
            return text, []
        calls.append(call)
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return "", calls


def _call(raw: str) -> ToolCall | None:
    try:
        obj, end = _decoder.raw_decode(raw)
    except ValueError:
        return None
    return _from_object(obj) if not raw[end:].strip() else None


def _from_object(obj: object) -> ToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} as a ToolCall; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


class ToolCallSplitter:
    """Feed one answer's content in order; each call returns the content that may be sent now.
    After the final feed, `calls` holds the answer's tool calls (none: everything was content)."""

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._held = ""
        self._holding = False
        """A call may have begun: everything from there is held for the answer's final parse."""
        self._started = False
        """Some non-blank content went out (llama3_json calls only start an answer)."""
        self._streams: list[CallStream] = []
        self._deltas: list[dict] = []
        self.calls: list[ToolCall] = []

    def feed(self, text: str, *, final: bool = False) -> str:
        text, self._held = self._held + text, ""
        if not self._holding:
            start = self._call_start(text)
            if start is None:
                keep = 0 if final else self._maybe_start(text)
                self._held = text[len(text) - keep:] if keep else ""
                out = text[:len(text) - keep]
                self._started = self._started or bool(out.strip())
                return out
            self._holding = True
            before, text = text[:start], text[start:]
        else:
            before = ""
        self._held = text
        self._stream_calls()
        if not final:
            return before
        content, calls = parse_tool_calls(self._parser, text)
        self.calls = _reconciled(calls, self._streams, self._deltas)
        return before + content

    def take_deltas(self) -> list[dict]:
        """The streamed `tool_calls` deltas the text fed so far added (each handed out once)."""
        deltas, self._deltas = self._deltas, []
        return deltas

    def _stream_calls(self) -> None:
        self._deltas += advance_calls(self._held, self._streams, self._next_call)

    def _next_call(self, text: str, pos: int) -> int | None:
        """Where the next call's object starts at or after `pos` in the held text, if written yet."""
        if self._parser == "hermes":
            start = text.find(HERMES_START, pos)
            return start + len(HERMES_START) if start >= 0 else None
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == 0 and text.startswith("<|python_tag|>"):
            return self._next_call(text, len("<|python_tag|>"))
        return pos if text.startswith("{", pos) else None

    def _call_start(self, text: str) -> int | None:
        """Where a call begins in `text`, or None."""
        if self._parser == "hermes":
            start = text.find(HERMES_START)
            return start if start >= 0 else None
        if self._started:
            return None
        body = text.lstrip()
        return len(text) - len(body) if body.startswith(("{", "<|python_tag|>")) else None

    def _maybe_start(self, text: str) -> int:
        """Length of the tail to hold back: it may still become the start of a call."""
        if self._parser == "hermes":
            return partial_marker(text, HERMES_START)
        if self._started:
            return 0
        body = text.lstrip()
        return len(text) if not body or "<|python_tag|>".startswith(body) else 0


class ForcedCalls:
    """tool_choice required or named: the grammar made the whole answer the call(s) as JSON (a
    named function's arguments; for required, a list of {"name", "parameters"}), so nothing is
    content. Streamed, each call goes out as it is written (its id and name first, then its
    arguments piece by piece; a named call's every piece is its arguments). Not streamed, JSON
    cut short (max_tokens) comes back as content."""

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._text = ""
        self._deltas: list[dict] = []
        self._streamed_id: str | None = None
        """A named call's id once its first delta went out (the answer is streamed)."""
        self._streams: list[CallStream] = []
        """required: the list's calls, as they are written (the answer is streamed)."""
        self.calls: list[ToolCall] = []

    def feed(self, text: str, *, final: bool = False) -> str:
        self._text += text
        streamed = self._streamed_id is not None or any(s.name is not None for s in self._streams)
        if streamed or not final:
            self._stream(text)
        if not final:
            return ""
        try:
            value = json.loads(self._text)
        except ValueError:
            value = None
        objects = [{"name": self._name, "arguments": value}] if self._name is not None else value
        calls = [_from_object(obj) for obj in objects] if isinstance(objects, list) else [None]
        if None in calls:
            return "" if streamed else self._text  # (streamed: its pieces went out as calls)
        if self._streamed_id is not None:
            self.calls = [replace(calls[0], id=self._streamed_id)]  # type: ignore[arg-type]
        else:
            self.calls = _reconciled(calls, self._streams, self._deltas)
        return ""

    def take_deltas(self) -> list[dict]:
        deltas, self._deltas = self._deltas, []
        return deltas

    def _stream(self, text: str) -> None:
        if self._name is None:
            self._deltas += advance_calls(self._text, self._streams, _next_listed_call)
            return
        if self._streamed_id is None:
            self._streamed_id = new_call_id()
            self._deltas.append({"index": 0, "id": self._streamed_id, "type": "function",
                                 "function": {"name": self._name, "arguments": ""}})
        if text:
            self._deltas.append({"index": 0, "function": {"arguments": text}})


def _next_listed_call(text: str, pos: int) -> int | None:
    """Where the next call's object of a JSON list of calls starts (after `[`, or after the
    previous call ending at `pos` and a comma), if written yet."""
    pos = skip_space(text, pos)
    if not text.startswith("," if pos else "[", pos):
        return None
    pos = skip_space(text, pos + 1)
    return pos if text.startswith("{", pos) else None


def _reconciled(calls: list, streams: list[CallStream], deltas: list[dict]) -> list[ToolCall]:
    """The final parse's calls, with the ids the streamed ones went out under; a call that did
    not stream goes out whole now (appended to `deltas`)."""
    streamed = {s.index: s for s in streams if s.name is not None}
    out = []
    for index, call in enumerate(calls):
        stream = streamed.get(index)
        if stream is None:
            deltas.append(call.as_dict(index))
        else:
            call = replace(call, id=stream.id)
        out.append(call)
    return out


class AnswerSplitter:
    """A chat answer's text as reasoning, content and tool calls, fed in order: the reasoning
    parser's split first (when the recipe names one), then the tool calls in the content (when
    the request has tools). `single_call` (parallel_tool_calls false): the first call only."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallSplitter | ForcedCalls | None, *,
                 single_call: bool = False) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self._single_call = single_call

    def feed(self, text: str, *, final: bool = False) -> Split:
        split = self._reasoning.feed(text, final=final) if self._reasoning is not None else Split("", text)
        if self._tools is not None:
            split.content = self._tools.feed(split.content, final=final)
            deltas = self._tools.take_deltas()
            if self._single_call:
                deltas = [delta for delta in deltas if delta["index"] == 0]
            split.call_deltas = _merged(deltas) or None
            if final:
                split.tool_calls = self._tools.calls[:1] if self._single_call else self._tools.calls
        return split


def _merged(deltas: list[dict]) -> list[dict]:
    """One delta per call in a chunk: a call's arguments pieces joined onto its first delta."""
    out: list[dict] = []
    for delta in deltas:
        if out and out[-1]["index"] == delta["index"] and "arguments" in delta["function"]:
            last = out[-1]
            last["function"] = {**last["function"],
                                "arguments": last["function"].get("arguments", "") + delta["function"]["arguments"]}
        else:
            out.append(delta)
    return out
