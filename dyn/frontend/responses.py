"""OpenAI response objects: full responses, SSE chunks, usage, logprobs.

Each stream builds its skeleton dict once and only swaps the changing fields
per chunk. The common chunk (new text, no logprobs, not the last) is cut from
that skeleton once: its bytes before and after the text, so such a chunk costs
the encoding of its text alone (0.2 us instead of 2.8 us for the whole dict;
a streamed answer is one chunk per engine step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

from dyn.control.sampling import PromptLogprobs
from dyn.frontend.reasoning import Split
from dyn.frontend.text import TextTokenizer
from dyn.frontend.worker_stream import Piece, Usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def usage_dict(usage: Usage) -> dict:
    return {"prompt_tokens": usage.num_prompt_tokens, "completion_tokens": usage.num_completion_tokens,
            "total_tokens": usage.num_prompt_tokens + usage.num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.num_cached_tokens}}


class StreamFormatter:
    """Turns pieces of one request into SSE `data:` lines (bytes)."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer: TextTokenizer,
                 *, include_usage: bool, index: int = 0, echo: Echo | None = None) -> None:
        """`index`: the choice this formatter writes (requests with n > 1 have one per choice);
        `echo`: a completion's prompt, sent as the stream's first text."""
        self.kind = kind
        self._tok = tokenizer
        self._include_usage = include_usage
        self._echo = echo
        self._offset = 0
        self._choice: dict = {"index": index, "logprobs": None, "finish_reason": None}
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._chunk = {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
                       "choices": [self._choice]}
        if include_usage:
            self._chunk["usage"] = None
        if kind == "chat":
            self._choice["delta"] = {"role": "assistant", "content": ""}
        self._text_head, self._text_tail = self._text_frame()

    def first(self) -> bytes:
        """The chat stream's opening chunk (role only); empty for completions."""
        if self.kind != "chat":
            return b""
        return _event(self._chunk)

    def piece(self, piece: Piece, num_migrations: int = 0, split: Split | None = None) -> bytes:
        """One chunk; the last one carries `dyn.migrations` when the request changed workers.
        `split`: the piece's text as reasoning and answer (a chat with a reasoning parser)."""
        if self._echo is not None:
            return self._echoed(piece) + self.piece(piece, num_migrations, split)
        text = piece.text if split is None else split.content
        if piece.logprobs is None and not piece.finish_reason and not (split and (split.reasoning or split.call_deltas)):
            return self._text_head + _dumps(text).encode() + self._text_tail
        choice = self._choice
        if self.kind == "chat":
            delta = {"content": text} if text or not piece.finish_reason else {}
            if split is not None and split.reasoning:
                delta = {"reasoning_content": split.reasoning, **({"content": text} if text else {})}
            if split is not None and split.call_deltas:
                delta["tool_calls"] = split.call_deltas
            choice["delta"] = delta
        else:
            choice["text"] = piece.text
        choice["logprobs"] = self._logprobs(piece) if piece.logprobs is not None else None
        choice["finish_reason"] = piece.finish_reason
        if piece.finish_reason and num_migrations:
            return _event(dict(self._chunk, dyn={"migrations": num_migrations}))
        return _event(self._chunk)

    def usage(self, usage: Usage) -> bytes:
        if not self._include_usage:
            return b""
        chunk = dict(self._chunk, choices=[], usage=usage_dict(usage))
        return _event(chunk)

    def _echoed(self, first: Piece) -> bytes:
        """The chunk of the echoed prompt, ahead of the first piece (which brings its scores)."""
        echo, self._echo = self._echo, None
        assert echo is not None
        choice = self._choice
        choice["text"], choice["logprobs"] = echo.text, None
        if first.logprobs is not None:
            choice["logprobs"] = logprobs = echoed_logprobs(self._tok, echo, first.prompt_logprobs)
            self._offset = end_offset(logprobs) if logprobs is not None else len(echo.text)
        return _event(self._chunk)

    def _text_frame(self) -> tuple[bytes, bytes]:
        """The bytes of a text-only chunk's event before and after its text: the skeleton
        encoded once around a marker (so both paths write the same fields in the same order)."""
        choice = dict(self._choice, logprobs=None, finish_reason=None)
        if self.kind == "chat":
            choice["delta"] = {"content": _MARK}
        else:
            choice["text"] = _MARK
        # (the last mark: the text comes after the id and model, which a request may name oddly)
        head, _, tail = _event(dict(self._chunk, choices=[choice])).rpartition(_dumps(_MARK).encode())
        return head, tail

    def _logprobs(self, piece: Piece) -> dict:
        top = (piece.top_ids, piece.top_logprobs) if piece.top_ids is not None else None
        if self.kind == "chat":
            return {"content": chat_logprobs(self._tok, piece.token_ids, piece.logprobs, top)}
        out = completion_logprobs(self._tok, piece.token_ids, piece.logprobs, self._offset, top)
        self._offset += len(piece.text)
        return out


@dataclass(slots=True)
class Answer:
    """One choice of a whole (non-streamed) response."""

    text: str
    finish_reason: str
    logprobs: dict | None = None
    split: Split | None = None
    """The text as reasoning and content (a chat with a reasoning parser; an empty part is null)."""
    prompt_logprobs: list | None = None
    """vLLM's prompt_logprobs answer (scored_prompt), when the request asked for it."""


def full_response(kind: str, request_id: str, model: str, answers: Sequence[Answer], usage: Usage,
                  prompt_logprobs: bool = False) -> bytes:
    """The whole response; with `prompt_logprobs` (asked for), the prompt's scores where vLLM puts
    them: on each completion choice, once for a chat (every choice has the same prompt)."""
    choices = []
    for index, answer in enumerate(answers):
        if kind == "chat":
            message: dict = {"role": "assistant", "content": answer.text}
            if answer.split is not None:
                message = {"role": "assistant", "content": answer.split.content or None,
                           "reasoning_content": answer.split.reasoning or None}
                if answer.split.tool_calls:
                    message["tool_calls"] = [call.as_dict() for call in answer.split.tool_calls]
            choices.append({"index": index, "message": message, "logprobs": answer.logprobs,
                            "finish_reason": answer.finish_reason})
        else:
            choices.append({"index": index, "text": answer.text, "logprobs": answer.logprobs,
                            "finish_reason": answer.finish_reason})
            if prompt_logprobs:
                choices[-1]["prompt_logprobs"] = answer.prompt_logprobs
    obj = "chat.completion" if kind == "chat" else "text_completion"
    body = {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_dict(usage)}
    if prompt_logprobs and kind == "chat":
        body["prompt_logprobs"] = next((a.prompt_logprobs for a in answers if a.prompt_logprobs is not None), None)
    if usage.num_migrations:
        body["dyn"] = {"migrations": usage.num_migrations}
    return _dumps(body).encode()


Top = tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]]
"""Per token: the likeliest tokens' ids and their logprobs (a request's top_logprobs)."""


def chat_logprobs(tok: TextTokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                  top: Top | None = None) -> list[dict]:
    out = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        text = tok.decode([tid])
        alternatives = [] if top is None else [
            {"token": (alt := tok.decode([alt_id])), "logprob": alt_lp, "bytes": list(alt.encode())}
            for alt_id, alt_lp in zip(top[0][i], top[1][i])]
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": alternatives})
    return out


def completion_logprobs(tok: TextTokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                        offset: int = 0, top: Top | None = None) -> dict:
    """The legacy completions object; `top_logprobs` maps token text to logprob per position (the
    sampled token alone without `top`, as OpenAI returns it for logprobs 0 or 1)."""
    tokens, offsets = [], []
    for tid in token_ids:
        text = tok.decode([tid])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    if top is None:
        alternatives = [{t: lp} for t, lp in zip(tokens, logprobs)]
    else:
        alternatives = [{tok.decode([alt_id]): alt_lp for alt_id, alt_lp in zip(ids, lps)}
                        for ids, lps in zip(*top)]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": alternatives,
            "text_offset": offsets}


@dataclass(frozen=True, slots=True)
class Echo:
    """A completion's prompt, sent back ahead of its answer (`echo`)."""

    text: str
    token_ids: Sequence[int]


def echoed_logprobs(tok: TextTokenizer, echo: Echo, scores: PromptLogprobs | None,
                    k: int | None = None) -> dict | None:
    """The echoed prompt's part of a completion's logprobs object: every prompt token, the first
    with null (nothing before it to score it on, as OpenAI's), with its k likeliest tokens (None:
    as many as scored; the scores may hold more, for prompt_logprobs); None when the engine gave
    no scores (the mock engine gives none): then only the answer's tokens have logprobs."""
    ids = echo.token_ids
    if scores is None or len(scores.logprobs) != len(ids) - 1:
        return None
    first = tok.decode(ids[:1])
    top = None
    if k != 0 and scores.top_ids is not None and scores.top_logprobs is not None:
        top = ([row[:k] for row in scores.top_ids], [row[:k] for row in scores.top_logprobs])
    rest = completion_logprobs(tok, ids[1:], scores.logprobs, len(first), top)
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def scored_prompt(tok: TextTokenizer, prompt_ids: Sequence[int], scores: PromptLogprobs | None,
                  k: int) -> list | None:
    """vLLM's prompt_logprobs answer: null for the first prompt token (nothing before it), then per
    token a map from token id to its logprob, rank and text, holding the prompt token and the k
    likeliest (ranked 1..k; the prompt token keeps its place when it is one of them). -inf becomes
    -9999.0, as vLLM writes it (JSON has no infinity). None when the engine gave no scores."""
    if scores is None or len(scores.logprobs) != len(prompt_ids) - 1:
        return None
    ranks = scores.ranks or [None] * len(scores.logprobs)
    tops = zip(scores.top_ids, scores.top_logprobs) if k and scores.top_ids and scores.top_logprobs else None
    out: list = [None]
    for tid, lp, rank in zip(prompt_ids[1:], scores.logprobs, ranks):
        entry = {str(tid): _prompt_entry(tok, tid, lp, rank)}
        if tops is not None:
            ids, lps = next(tops)
            for place, (alt, alt_lp) in enumerate(zip(ids[:k], lps[:k]), 1):
                entry[str(alt)] = _prompt_entry(tok, alt, alt_lp, place)
        out.append(entry)
    return out


def _prompt_entry(tok: TextTokenizer, token_id: int, logprob: float, rank: int | None) -> dict:
    return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": tok.decode([token_id])}


def end_offset(logprobs: dict) -> int:
    """The text offset right after a completion logprobs object's last token."""
    tokens = logprobs["tokens"]
    return logprobs["text_offset"][-1] + len(tokens[-1]) if tokens else 0


def error_event(body: dict) -> bytes:
    return _event(body)


DONE = b"data: [DONE]\n\n"
_MARK = "\x00dyn-text\x00"
"""Stands for a chunk's text while its frame is cut."""


def _event(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"
