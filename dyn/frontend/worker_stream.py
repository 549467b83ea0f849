"""One request's messages from one worker, turned into what the client gets (`Piece`s).

The frontend owns the output limits: stop strings (TextStream) and max_tokens
are enforced here, so a worker that overshoots is cancelled, and leaving the
generator early (client gone, stop string) always sends Cancel to the worker.

A worker is lost when the daemon reports it dead (its streams fail at once,
see WorkerPool.update) or when it stays silent past the stall deadline:
router.stall_timeout_s beyond the expected time of the next message (the
profile's prefill estimate for a first token, a decode step after that).
`WorkerStream` raises WorkerFailed then; dyn.frontend.generate decides where
the request goes next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator, Callable

from dyn.control.requests import ATTEMPT_SEPARATOR, Finish, GenerateRequest, RequestFailed, TokenChunk
from dyn.control.sampling import PromptLogprobs, SamplingParams
from dyn.frontend.inbox import Inbox
from dyn.frontend.protocol import GenerationRequest
from dyn.frontend.text import TextStream

if TYPE_CHECKING:
    from dyn.frontend.generate import Dispatcher

log = logging.getLogger("dyn.frontend.generate")
"""The request path logs under one name (JSON logs carry it), as before generate.py was split."""

_MAX_EXTENSIONS = 3
"""Times a first-token deadline is extended while the worker keeps streaming other requests."""


@dataclass(slots=True)
class Piece:
    """What the client gets next: text (stop strings applied) and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    top_ids: list[list[int]] | None = None
    """top_logprobs: per token, the likeliest tokens and (top_logprobs) their logprobs."""
    top_logprobs: list[list[float]] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """SamplingParams.prompt_logprobs: the prompt's scores, on the request's first piece."""


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    prefill_worker: str | None = None
    decode_worker: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_migrations: int = 0
    num_retries: int = 0
    finish_reason: str | None = None
    ttft_s: float | None = None
    more_ready: bool = False
    """The worker's next message has already arrived: a streaming handler may write this piece
    together with the next one (a burst of tokens costs one socket write, not one per token)."""


class WorkerFailed(Exception):
    """A worker failed or lost one request (the RequestFailed says how)."""

    def __init__(self, failure: RequestFailed) -> None:
        self.failure = failure
        super().__init__(failure.message)


class WorkerStream:
    """Output state of one request (tokens sent, stop strings, max_tokens) and its streams from workers."""

    def __init__(self, d: Dispatcher, req: GenerationRequest, prompt_ids: list[int], rid: str,
                 usage: Usage, salt: int) -> None:
        self.d = d
        self.req = req
        self.prompt = prompt_ids
        self.rid = rid
        self.usage = usage
        self.salt = salt
        usage.num_prompt_tokens = len(prompt_ids)
        assert req.sampling.max_tokens is not None, "the edge resolves max_tokens (GenerationRequest.for_prompt)"
        self.max_tokens = req.sampling.max_tokens
        self.text = TextStream(d.tokenizer, req.sampling.stop, prefix_ids=prompt_ids, lazy=not req.stream,
                               include_stop=req.include_stop, min_tokens=req.sampling.min_tokens,
                               skip_special_tokens=req.skip_special_tokens,
                               spaces_between_special_tokens=req.spaces_between_special_tokens)
        self._ending: frozenset[int] = frozenset()
        """With skip_special_tokens false: the tokens that end an answer (EOS unless ignore_eos, the
        stop_token_ids), whose text is left out as vLLM leaves it out (include_stop keeps it)."""
        if not req.skip_special_tokens and not req.include_stop:
            self._ending = frozenset((() if req.sampling.ignore_eos else tuple(d.tokenizer.eos_token_ids))
                                     + tuple(req.sampling.stop_token_ids))
        self.emitted = usage.token_ids
        self.finish_reason: str | None = None
        self.start = time.perf_counter()
        self.last = 0.0
        self._num_sent: dict[str, int] = {}
        """Attempts of this request sent to each worker (see _wire_id)."""
        self.prompt_scored = False
        """The prompt's scores (prompt_logprobs) came: a later attempt (decode after a remote
        prefill, a migration's longer prompt) does not ask for them again."""

    async def _follow(self, worker_id: str, request: GenerateRequest,
                      on_finish: Callable[[Finish], Piece | None] | None = None) -> AsyncIterator[Piece]:
        """Pieces of one request on one worker, through its Finish (`on_finish`, default
        `_finished`, turns that into the last piece, or None)."""
        async with aclosing(self._messages(worker_id, request)) as messages:
            async for message in messages:
                if isinstance(message, TokenChunk):
                    piece = self._piece(message)
                    if piece is not None:
                        yield piece
                        if self.finish_reason:
                            return
                elif isinstance(message, Finish):
                    last = (on_finish or self._finished)(message)
                    if last is not None:
                        yield last
                    return

    def _finished(self, message: Finish) -> Piece:
        if message.reason == "abort":
            raise WorkerFailed(RequestFailed(self.rid, "worker_lost", "the worker aborted the request", True))
        return self._final("stop" if message.reason == "stop" else "length")

    async def _messages(self, worker_id: str, request: GenerateRequest):
        """Messages of one request on one worker; cancels it there unless it ended by itself."""
        d, pool = self.d, self.d.pool
        wire_id = self._wire_id(worker_id)
        if wire_id != request.request_id:
            request = replace(request, request_id=wire_id)
        queue = await pool.open(worker_id, request)
        ended = False
        # Without streaming nobody sees chunk boundaries: merge the chunks already
        # queued so a burst of tokens costs one pass through the generators.
        coalesce = not self.req.stream
        pending = None
        stalled = False
        watch: _StallWatch | None = None  # from the first message on: the stall deadline
        extensions = 0
        num_tokens = len(request.prompt_token_ids)
        try:
            while True:
                if pending is not None:
                    message, pending = pending, None
                elif watch is not None:
                    message = queue.get_nowait() if not queue.empty() else await queue.get()
                else:  # the first message: prefill may queue behind others on a worker that keeps talking
                    wait_s = d.expected_wait_s(worker_id, num_tokens, first=True)
                    try:
                        async with asyncio.timeout(wait_s):
                            message = await queue.get()
                    except TimeoutError:
                        if extensions < _MAX_EXTENSIONS and self._worker_alive(worker_id):
                            extensions += 1
                            continue
                        stalled = True
                        raise WorkerFailed(self._stall(worker_id, wait_s)) from None
                    watch = _StallWatch(queue, lambda: d.expected_wait_s(worker_id, num_tokens, first=False))
                    if coalesce and not self.req.sampling.stop:
                        queue.quiet = TokenChunk  # nobody sees tokens before the end: wake for the end only
                if message is _STALLED:
                    stalled = True
                    raise WorkerFailed(self._stall(worker_id, watch.wait_s))
                if coalesce and type(message) is TokenChunk and not queue.empty():
                    message, pending = _merge(message, queue)
                if isinstance(message, RequestFailed):
                    ended = True
                    raise WorkerFailed(message)
                if isinstance(message, Finish):
                    ended = True
                    if message.reason != "abort":
                        d.routing.breakers.on_success(worker_id)
                self.usage.more_ready = pending is not None or not queue.empty()
                yield message
                if ended:
                    return
        finally:
            if watch is not None:
                watch.close()
            # At max_tokens the worker (told the same limit) finishes by itself; a
            # prefill worker is cancelled anyway so it can unpin the offered KV.
            cancel = not ended and (self.finish_reason != "length" or request.prefill_only)
            if cancel:
                reason = "stop" if self.finish_reason else "stall" if stalled else "disconnect"
                d.metrics.cancelled.labels(reason).inc()
            pool.close_stream(wire_id, cancel=cancel)

    def _stall(self, worker_id: str, wait_s: float) -> RequestFailed:
        return RequestFailed(self.rid, "worker_lost", f"worker {worker_id} sent nothing for this request "
                             f"in {wait_s:.1f} s (router.stall_timeout_s {self.d.stall_timeout_s:g} s past "
                             "the expected step time)", True)

    def _wire_id(self, worker_id: str) -> str:
        """The request's id on `worker_id` for this attempt: its own id the first time, then
        `<id>#<n>` (ATTEMPT_SEPARATOR; no client X-Request-Id holds it). A worker sent this
        request before may still send messages of the earlier attempt (tokens of a step before
        the cancel landed, the abort that answers it, a Finish that crossed the cancel): under a
        fresh id they match no open stream and are dropped, instead of ending or lengthening the
        new attempt, and the worker does not refuse the new one as "already running"."""
        num_sent = self._num_sent.get(worker_id, 0)
        self._num_sent[worker_id] = num_sent + 1
        return self.rid if num_sent == 0 else f"{self.rid}{ATTEMPT_SEPARATOR}{num_sent}"

    def _worker_alive(self, worker_id: str) -> bool:
        handle = self.d.pool.workers.get(worker_id)
        return (handle is not None and handle.is_ready
                and time.monotonic() - handle.last_heard < self.d.stall_timeout_s)

    def _piece(self, chunk: TokenChunk) -> Piece | None:
        now = time.perf_counter()
        metrics = self.d.metrics
        if not self.emitted:
            if not self.req.beam_search:
                metrics.ttft.observe(now - self.start)
                if self.req.adapter is not None:
                    metrics.lora_ttft.labels(self.req.adapter).observe(now - self.start)
            self.usage.num_cached_tokens = chunk.num_cached_tokens
            self.usage.ttft_s = now - self.start
            log.debug("first token after %.1f ms (%d prompt tokens cached)", (now - self.start) * 1000,
                      chunk.num_cached_tokens, extra={"request_id": self.rid})
        elif self.req.stream:  # inter-token latency is what a streaming client sees
            metrics.itl.observe(now - self.last)
        self.last = now
        ids = chunk.token_ids[: self.max_tokens - len(self.emitted)]
        shown = ids[:-1] if ids and ids[-1] in self._ending else ids
        if self.req.sampling.stop and len(shown) > 1:
            # Token by token, so usage counts end at the token that completed a stop string.
            text = ""
            for idx in range(len(shown)):
                text += self.text.add(shown[idx:idx + 1])
                if self.text.stopped:
                    ids = ids[:idx + 1]
                    break
        else:
            text = self.text.add(shown)
        self.emitted.extend(ids)
        logprobs = chunk.logprobs[: len(ids)] if self.req.sampling.logprobs and chunk.logprobs else None
        top = None
        if logprobs is not None and self.req.sampling.top_logprobs and chunk.top_ids is not None:
            top = chunk.top_ids[: len(ids)], chunk.top_logprobs[: len(ids)]  # type: ignore[index]
        if self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.emitted) >= self.max_tokens:
            self.finish_reason = "length"
            text += self.text.flush()
        if not text and not self.finish_reason and not ids:
            return None
        if chunk.prompt_logprobs is not None:
            self.prompt_scored = True
            return Piece(text, ids, logprobs, self.finish_reason, *(top or (None, None)), chunk.prompt_logprobs)
        if top is not None:
            return Piece(text, ids, logprobs, self.finish_reason, *top)
        return Piece(text, ids, logprobs, self.finish_reason)

    def _final(self, reason: str) -> Piece:
        self.finish_reason = reason
        return Piece(self.text.flush(), [], None, reason)

    def _sampling(self, max_tokens: int | None = None) -> SamplingParams:
        """The request's sampling for a worker, `max_tokens` left (default: all). Stop strings stay
        here: TextStream matches them on the text the client sees, prompt included."""
        sampling = self.req.sampling
        # A re-sent request's prompt holds the tokens already made: they count toward min_tokens.
        min_tokens = max(sampling.min_tokens - len(self.emitted), 0) if max_tokens else sampling.min_tokens
        return replace(sampling, max_tokens=max_tokens or self.max_tokens, stop=(), min_tokens=min_tokens,
                       prompt_logprobs=sampling.prompt_logprobs if self.scores_prompt else None)

    @property
    def scores_prompt(self) -> bool:
        """The next attempt must score the prompt (asked for, not yet received)."""
        return self.req.sampling.prompt_logprobs is not None and not self.prompt_scored


_STALLED = object()
"""Put in a stream's queue by its _StallWatch: nothing came for a whole wait."""


class _StallWatch:
    """A stream's stall deadline after its first message, without a timer per message.

    An `asyncio.timeout` around every wait starts and stops a timer for each streamed token
    (~9 us here, a tenth of a streamed request's frontend CPU at 32 tokens). Here the inbox
    stamps each arrival and one timer looks at the deadline, re-arming itself from the latest
    stamp; once the worker has sent nothing for a whole wait, it queues _STALLED, which the
    consumer reads as the timeout (after whatever arrived before it)."""

    def __init__(self, queue: Inbox, wait_s: Callable[[], float]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._wait = wait_s
        """The current deadline (a worker's role and profile may change mid-request)."""
        self.wait_s = wait_s()
        self._handle = self._loop.call_at(queue.last_put + self.wait_s, self._check)

    def _check(self) -> None:
        self.wait_s = self._wait()
        deadline = self._queue.last_put + self.wait_s
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
        else:
            self._queue.put_nowait(_STALLED)

    def close(self) -> None:
        self._handle.cancel()


def _merge(first: TokenChunk, queue: Inbox) -> tuple[TokenChunk, object | None]:
    """`first` plus the TokenChunks queued right behind it; returns the first other message too."""
    merged = TokenChunk(first.request_id, list(first.token_ids),
                        list(first.logprobs) if first.logprobs is not None else None, first.num_cached_tokens,
                        top_ids=list(first.top_ids) if first.top_ids is not None else None,
                        top_logprobs=list(first.top_logprobs) if first.top_logprobs is not None else None,
                        prompt_logprobs=first.prompt_logprobs)
    while not queue.empty():
        nxt = queue.get_nowait()
        if (type(nxt) is not TokenChunk or (nxt.logprobs is None) != (merged.logprobs is None)
                or (nxt.top_ids is None) != (merged.top_ids is None)):
            return merged, nxt
        merged.token_ids.extend(nxt.token_ids)
        if merged.logprobs is not None:
            merged.logprobs.extend(nxt.logprobs)
        if merged.top_ids is not None:
            merged.top_ids.extend(nxt.top_ids)
            merged.top_logprobs.extend(nxt.top_logprobs)
    return merged, None
