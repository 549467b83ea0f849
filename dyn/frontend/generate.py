"""One request's trip through the workers: route, (remote prefill,) decode, stream back.

    client <- pieces <- Dispatcher.generate
                          | choose_workers -> (prefill | None, decode)
                          | prefill worker: GenerateRequest(prefill_only) -> TokenChunk(first), Finish(kv_offer)
                          | decode worker:  GenerateRequest(kv_source=offer, first_token) -> TokenChunks, Finish
                          '-> on a failed prefill / lost worker: plain request on a decode worker,
                              resuming after the tokens already sent (greedy output is unchanged)

The frontend owns the output limits: stop strings (TextStream) and max_tokens
are enforced here, so a worker that overshoots is cancelled, and leaving the
generator early (client gone, stop string) always sends Cancel to the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from dyn.control.requests import Finish, GenerateRequest, RequestFailed, TokenChunk
from dyn.frontend.metrics import FrontendMetrics
from dyn.frontend.protocol import ApiError, GenerationRequest
from dyn.frontend.routing import RETRY_AFTER_S, Routing
from dyn.frontend.text import TextStream, TextTokenizer
from dyn.frontend.workers import WorkerPool

MAX_ATTEMPTS = 3
"""Workers tried per request when one is full or lost before finishing it."""
_RETRYABLE = frozenset({"overloaded", "worker_lost", "internal", "kv_transfer"})


@dataclass(slots=True)
class Piece:
    """What the client gets next: text (stop strings applied) and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    prefill_worker: str | None = None
    decode_worker: str | None = None
    token_ids: list[int] = field(default_factory=list)


class _WorkerFailed(Exception):
    def __init__(self, failure: RequestFailed) -> None:
        self.failure = failure
        super().__init__(failure.message)


class Dispatcher:
    """Runs generation requests over the worker pool; shared by every HTTP request."""

    def __init__(self, pool: WorkerPool, routing: Routing, tokenizer: TextTokenizer,
                 metrics: FrontendMetrics, *, max_context: int, stall_timeout_s: float = 120.0) -> None:
        self.pool = pool
        self.routing = routing
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_context = max_context
        self.stall_timeout_s = stall_timeout_s
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def generate(self, req: GenerationRequest, prompt_ids: list[int], request_id: str,
                 usage: Usage) -> AsyncIterator[Piece]:
        """Stream pieces; the last one has finish_reason. Raises ApiError (503 when full)."""
        return _Run(self, req, prompt_ids, request_id, usage).run()


class _Run:
    def __init__(self, d: Dispatcher, req: GenerationRequest, prompt_ids: list[int], rid: str,
                 usage: Usage) -> None:
        self.d = d
        self.req = req
        self.prompt = prompt_ids
        self.rid = rid
        self.usage = usage
        usage.num_prompt_tokens = len(prompt_ids)
        self.max_tokens = req.max_tokens or max(d.max_context - len(prompt_ids), 1)
        self.text = TextStream(d.tokenizer, req.stop, prefix_ids=prompt_ids, lazy=not req.stream)
        self.emitted = usage.token_ids
        self.finish_reason: str | None = None
        self.start = time.perf_counter()
        self.last = 0.0

    async def run(self) -> AsyncIterator[Piece]:
        choice = self.d.routing.choose_workers(self.prompt, self.req.hints)
        self.usage.decode_worker = choice.decode
        if choice.prefill is not None:
            self.usage.prefill_worker = choice.prefill
            offer = None
            try:
                async with aclosing(self._remote_prefill(choice.prefill)) as pieces:
                    async for piece in pieces:
                        yield piece
                        if self.finish_reason:
                            return
                offer = self._offer
            except _WorkerFailed:
                offer = None
            if offer is not None:
                self.d.metrics.prefill_paths.labels("remote").inc()
                try:
                    async with aclosing(self._decode(choice.decode, offer)) as pieces:
                        async for piece in pieces:
                            yield piece
                    return
                except _WorkerFailed as exc:
                    if exc.failure.code not in _RETRYABLE:
                        raise _api_error(exc.failure) from None
            self.d.metrics.prefill_paths.labels("fallback").inc()
        else:
            self.d.metrics.prefill_paths.labels("local").inc()
        async with aclosing(self._plain(choice.decode)) as pieces:
            async for piece in pieces:
                yield piece

    async def _remote_prefill(self, worker_id: str) -> AsyncIterator[Piece]:
        self._offer = None
        request = GenerateRequest(self.rid, self.prompt, self._sampling(), priority=self.req.hints.priority,
                                  prefill_only=True)
        async with aclosing(self._messages(worker_id, request)) as messages:
            async for message in messages:
                if isinstance(message, TokenChunk):
                    piece = self._piece(message)
                    if piece is not None:
                        yield piece
                        if self.finish_reason:
                            return
                elif isinstance(message, Finish):
                    if message.reason == "stop":
                        yield self._final("stop")
                    elif message.kv_offer is not None and self.emitted:
                        self._offer = message.kv_offer

    async def _decode(self, worker_id: str, offer: dict) -> AsyncIterator[Piece]:
        request = GenerateRequest(self.rid, self.prompt, self._sampling(), priority=self.req.hints.priority,
                                  kv_source=offer, first_token=self.emitted[0])
        async with aclosing(self._follow(worker_id, request)) as pieces:
            async for piece in pieces:
                yield piece

    async def _plain(self, worker_id: str) -> AsyncIterator[Piece]:
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            # Resume after what the client already has: same tokens under greedy decoding.
            request = GenerateRequest(self.rid, self.prompt + self.emitted,
                                      self._sampling(self.max_tokens - len(self.emitted)),
                                      priority=self.req.hints.priority)
            try:
                async with aclosing(self._follow(worker_id, request)) as pieces:
                    async for piece in pieces:
                        yield piece
                return
            except _WorkerFailed as exc:
                failure = exc.failure
                if failure.code not in _RETRYABLE or not failure.retryable or attempt == MAX_ATTEMPTS - 1:
                    raise _api_error(failure) from None
                tried.add(worker_id)
                try:
                    worker_id = self.d.routing.choose_workers(self.prompt + self.emitted, self.req.hints,
                                                              exclude=frozenset(tried)).decode
                except ApiError:
                    raise _api_error(failure) from None  # no other worker: report the last refusal
                self.usage.decode_worker = worker_id

    async def _follow(self, worker_id: str, request: GenerateRequest) -> AsyncIterator[Piece]:
        async with aclosing(self._messages(worker_id, request)) as messages:
            async for message in messages:
                if isinstance(message, TokenChunk):
                    piece = self._piece(message)
                    if piece is not None:
                        yield piece
                        if self.finish_reason:
                            return
                elif isinstance(message, Finish):
                    if message.reason == "abort":
                        raise _WorkerFailed(RequestFailed(self.rid, "worker_lost",
                                                          "the worker aborted the request", True))
                    yield self._final("stop" if message.reason == "stop" else "length")
                    return

    async def _messages(self, worker_id: str, request: GenerateRequest):
        """Messages of one request on one worker; cancels it there unless it ended by itself."""
        pool = self.d.pool
        queue = await pool.open(worker_id, request)
        ended = False
        # Without streaming nobody sees chunk boundaries: merge the chunks already
        # queued so a burst of tokens costs one pass through the generators.
        coalesce = not self.req.stream
        pending = None
        stalled = False
        try:
            while True:
                try:
                    if pending is not None:
                        message, pending = pending, None
                    elif queue.empty():
                        async with asyncio.timeout(self.d.stall_timeout_s):
                            message = await queue.get()
                    else:
                        message = queue.get_nowait()
                    if coalesce and type(message) is TokenChunk and not queue.empty():
                        message, pending = _merge(message, queue)
                except TimeoutError:
                    stalled = True
                    raise _WorkerFailed(RequestFailed(self.rid, "worker_lost",
                                                      f"worker {worker_id} sent nothing for "
                                                      f"{self.d.stall_timeout_s:.0f} s", True)) from None
                if isinstance(message, RequestFailed):
                    ended = True
                    raise _WorkerFailed(message)
                if isinstance(message, Finish):
                    ended = True
                yield message
                if ended:
                    return
        finally:
            # At max_tokens the worker (told the same limit) finishes by itself; a
            # prefill worker is cancelled anyway so it can unpin the offered KV.
            cancel = not ended and (self.finish_reason != "length" or request.prefill_only)
            if cancel:
                reason = "stop" if self.finish_reason else "stall" if stalled else "disconnect"
                self.d.metrics.cancelled.labels(reason).inc()
            pool.close_stream(self.rid, cancel=cancel)

    def _piece(self, chunk: TokenChunk) -> Piece | None:
        now = time.perf_counter()
        metrics = self.d.metrics
        if not self.emitted:
            metrics.ttft.observe(now - self.start)
            self.usage.num_cached_tokens = chunk.num_cached_tokens
        elif self.req.stream:  # inter-token latency is what a streaming client sees
            metrics.itl.observe(now - self.last)
        self.last = now
        ids = chunk.token_ids[: self.max_tokens - len(self.emitted)]
        if self.req.stop and len(ids) > 1:
            # Token by token, so usage counts end at the token that completed a stop string.
            text = ""
            for idx in range(len(ids)):
                text += self.text.add(ids[idx:idx + 1])
                if self.text.stopped:
                    ids = ids[:idx + 1]
                    break
        else:
            text = self.text.add(ids)
        self.emitted.extend(ids)
        logprobs = chunk.logprobs[: len(ids)] if self.req.logprobs and chunk.logprobs else None
        if self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.emitted) >= self.max_tokens:
            self.finish_reason = "length"
            text += self.text.flush()
        if not text and not self.finish_reason and not ids:
            return None
        return Piece(text, ids, logprobs, self.finish_reason)

    def _final(self, reason: str) -> Piece:
        self.finish_reason = reason
        return Piece(self.text.flush(), [], None, reason)

    def _sampling(self, max_tokens: int | None = None) -> dict:
        req = self.req
        sampling = {"max_tokens": max_tokens or self.max_tokens, "temperature": req.temperature,
                    "top_p": req.top_p, "top_k": max(req.top_k, 0), "ignore_eos": req.ignore_eos,
                    "logprobs": req.logprobs}
        if req.seed is not None:
            sampling["seed"] = req.seed
        if req.stop_token_ids:
            sampling["stop_token_ids"] = list(req.stop_token_ids)
        return sampling


def _merge(first: TokenChunk, queue: asyncio.Queue) -> tuple[TokenChunk, object | None]:
    """`first` plus the TokenChunks queued right behind it; returns the first other message too."""
    ids = list(first.token_ids)
    logprobs = list(first.logprobs) if first.logprobs is not None else None
    while not queue.empty():
        nxt = queue.get_nowait()
        if type(nxt) is not TokenChunk or (nxt.logprobs is None) != (logprobs is None):
            return TokenChunk(first.request_id, ids, logprobs, first.num_cached_tokens), nxt
        ids.extend(nxt.token_ids)
        if logprobs is not None:
            logprobs.extend(nxt.logprobs)
    return TokenChunk(first.request_id, ids, logprobs, first.num_cached_tokens), None


def _api_error(failure: RequestFailed) -> ApiError:
    if failure.code == "bad_request":
        return ApiError(failure.message, status=400, code="bad_request")
    if failure.code == "overloaded":
        return ApiError(f"workers are overloaded ({failure.message}); retry later", status=503,
                        code="overloaded", type="service_unavailable", retry_after_s=RETRY_AFTER_S)
    return ApiError(f"the worker failed the request: {failure.message}", status=502,
                    code=failure.code, type="server_error")
