"""A reasoning model's answer split into `reasoning_content` and `content` (recipe model.reasoning_parser).

DeepSeek-R1 and Qwen3 think inside `<think>...</think>`, and their chat templates open the
`<think>` themselves, so the output is reasoning until `</think>` and the answer after it.
vLLM's `--reasoning-parser deepseek_r1|qwen3` returns the two apart (DeepSeek's API and
SGLang name the field `reasoning_content`, as dyn does); without a parser the client gets both
in `content`, as before. The split is on text, as vLLM's is (the markers are ordinary added
tokens of these vocabularies, decoded into the text): a marker is looked for across pieces,
holding back only a tail that could still begin one. Differences kept on purpose: an output
that never closes its reasoning is all reasoning (vLLM's deepseek_r1 does the same), and
qwen3 with chat_template_kwargs {"enable_thinking": false} starts in the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyn.config.recipe import ReasoningParser

START, END = "<think>", "</think>"


@dataclass(slots=True)
class Split:
    reasoning: str
    content: str
    tool_calls: list | None = None
    """dyn.frontend.tool_calls.ToolCall's of the answer (set on the last split, when the request has tools)."""
    call_deltas: list | None = None
    """The streamed `tool_calls` deltas this piece adds (OpenAI's delta objects)."""


class ReasoningSplitter:
    """Feed one request's text in order; each call returns what may be sent now, split."""

    def __init__(self, *, thinking: bool = True) -> None:
        self._thinking = thinking
        self._opening = thinking
        """Before any reasoning text: a `<think>` the model writes itself is dropped."""
        self._held = ""

    def feed(self, text: str, *, final: bool = False) -> Split:
        text, self._held = self._held + text, ""
        if not self._thinking:
            return Split("", text)
        if self._opening:
            stripped = text.lstrip("\n")
            if stripped.startswith(START):
                text, self._opening = stripped[len(START):], False
            elif not final and START.startswith(stripped):
                self._held = text  # may still become "<think>"
                return Split("", "")
            elif stripped:
                self._opening = False
        end = text.find(END)
        if end >= 0:
            self._thinking = False
            return Split(text[:end], text[end + len(END):])
        keep = 0 if final else partial_marker(text, END)
        self._held = text[len(text) - keep:] if keep else ""
        return Split(text[:len(text) - keep], "")


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def thinking_at_start(parser: ReasoningParser, template_kwargs: dict | None) -> bool:
    """Whether a request's output starts inside the reasoning."""
    if parser == "qwen3" and template_kwargs and template_kwargs.get("enable_thinking") is False:
        return False
    return True
