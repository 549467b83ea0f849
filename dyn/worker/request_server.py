"""The worker's side of the request plane: a ROUTER that feeds the engine loop.

Streams are keyed by request id; each remembers the frontend connection it
came from. Every accepted request ends with exactly one Finish or
RequestFailed, including when the worker drains or shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

import msgpack
import zmq.asyncio

from dyn import PROTOCOL_VERSION
from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest
from dyn.control.requests import (REQUEST_CODEC, Cancel, CloseSession, Finish, GenerateRequest,
                                  RequestFailed)
from dyn.control.loop_router import LoopRouter
from dyn.control.sockets import BadMessages, Security
from dyn.engine.backend import EngineRequest, PromptLogprobs, TokenOutput
from dyn.errors import DynError, RequestError
from dyn.kv.retention import Retention
from dyn.worker.engine_loop import EngineLoop

log = logging.getLogger(__name__)

KvHook = Callable[["Stream", GenerateRequest], Awaitable[None]]
"""Disaggregation hooks (the shuttle): import before decoding / export after prefill."""


@dataclass(slots=True)
class Stream:
    request_id: str
    client: bytes
    num_prompt_tokens: int
    prefill_only: bool = False
    num_completion_tokens: int = 0
    kv_offer: dict | None = None
    hold_s: float = 0.0
    """GenerateRequest.hold_s: how long tokens after the first may be kept back."""
    held: TokenOutput | None = None
    """Tokens kept back (hold_s), oldest first; sent together when they have waited hold_s or
    the request ends."""
    held_since: float = 0.0
    kv_import: asyncio.Task | None = None
    """The KV pull and decode start of a hand-off, running beside the request plane."""


class RequestServer:
    def __init__(self, ctx: zmq.asyncio.Context, bind_host: str, security: Security, loop: EngineLoop | None,
                 *, max_waiting: int = 256, process_id: str = "worker") -> None:
        self._router = LoopRouter(ctx, f"tcp://{bind_host}:*", security)
        self.address = self._router.address
        self._loop = loop
        self._max_waiting = max_waiting
        self._streams: dict[str, Stream] = {}
        self.bad = BadMessages(f"{process_id} requests")
        self.accepting = True
        self.requests_total = 0
        self.cancels_total = 0
        self.errors_total = 0
        """Messages whose handling raised (logged; the request, if any, failed)."""
        self._tasks: set[asyncio.Task] = set()
        """KV imports and request preparations under way (the loop keeps only a weak reference to a task)."""
        self._speculative: set[str] = set()
        """Request ids of running speculative prefills (cancelled when real work queues)."""
        self.speculative_refused = 0
        self.speculative_cancelled = 0
        self.import_kv: KvHook | None = None
        self.export_kv: KvHook | None = None
        self.kv_snapshot: Callable[[], KvSnapshot] | None = None
        self._aio = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._pending: list[TokenOutput] = []
        self._pending_lock = threading.Lock()
        self._wake_scheduled = False

    def attach(self, loop: EngineLoop) -> None:
        """Start feeding an engine loop (requests before this are refused as overloaded)."""
        self._loop = loop

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def on_outputs(self, outputs: list[TokenOutput]) -> None:
        """Called on the engine thread: hand the outputs to the event loop.

        Steps that end while the loop has not yet taken the previous ones are handed over
        together (one wake-up), and a request's tokens from those steps go out as one chunk:
        a fast engine (short steps, the mock) costs a message per burst, not per token.
        From the event loop's own thread (an engine stepped there, dyn.worker.inline_loop, hands
        over a burst of steps at once), the outputs are delivered at once."""
        if threading.get_ident() == self._thread_id:
            self._deliver(_merge_outputs(outputs) if len(outputs) > 1 else outputs)
            return
        with self._pending_lock:
            self._pending.extend(outputs)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._aio.call_soon_threadsafe(self._deliver_pending)

    def _deliver_pending(self) -> None:
        with self._pending_lock:
            outputs, self._pending = self._pending, []
            self._wake_scheduled = False
        self._deliver(_merge_outputs(outputs) if len(outputs) > 1 else outputs)

    async def serve(self) -> None:
        while True:
            received = await self._router.receive(REQUEST_CODEC, self.bad)
            if received is None:
                continue
            client, message = received
            try:
                await self._handle(client, message)
            except Exception as exc:  # a bug met by one message must not stop the worker serving
                self._handling_failed(client, message, exc)

    async def _handle(self, client: bytes, message: object) -> None:
        if isinstance(message, GenerateRequest):
            await self._start(client, message)
        elif isinstance(message, Cancel) and self._loop is not None:
            await self._cancel(message.request_id)
        elif isinstance(message, CloseSession) and self._loop is not None:
            self._loop.submit(lambda e, sid=message.session_id: e.release_session(sid))
        elif isinstance(message, KvSnapshotRequest) and self.kv_snapshot is not None:
            self._send(client, self.kv_snapshot())
        else:
            self.bad.record(f"unexpected {type(message).__name__}")

    def _handling_failed(self, client: bytes, message: object, exc: Exception) -> None:
        """Log the error; a request it hit is aborted and failed (retryable: another worker may
        not meet it, and the frontend's migration limit bounds the retries)."""
        self.errors_total += 1
        rid = getattr(message, "request_id", None)
        log.error("handling %s failed: %s: %s", type(message).__name__, type(exc).__name__, exc,
                  exc_info=exc, extra={"request_id": rid} if rid else None)
        if not isinstance(message, GenerateRequest):
            return
        if self._streams.pop(rid, None) is not None:  # (else it failed before the engine saw it)
            self._speculative.discard(rid)
            self._loop.submit(lambda e: e.abort(rid))  # (an error here lands in the returned future)
        self._fail(client, rid, "internal", f"worker error: {type(exc).__name__}: {exc}", True)

    async def fail_all(self, message: str, *, code: str = "internal", retryable: bool = True) -> None:
        """End every open stream explicitly (shutdown), aborting it in the engine."""
        for stream in list(self._streams.values()):
            if stream.kv_import is not None:
                stream.kv_import.cancel()
            self._loop.submit(lambda e, rid=stream.request_id: e.abort(rid))
            self._fail(stream.client, stream.request_id, code, message, retryable)
        self._streams.clear()

    async def wait_drained(self, timeout_s: float) -> bool:
        deadline = self._aio.time() + timeout_s
        while self._streams and self._aio.time() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    def close(self) -> None:
        self._router.close(linger_ms=500)

    async def _start(self, client: bytes, msg: GenerateRequest) -> None:
        rid = msg.request_id
        if not self.accepting or self._loop is None:
            reason = "worker is draining" if self._loop else "worker is still loading"
            self._fail(client, rid, "overloaded", reason, True)
            return
        if rid in self._streams:
            self._fail(client, rid, "bad_request", f"request id {rid!r} is already running", False)
            return
        try:
            request = engine_request(msg)
        except RequestError as exc:
            self._fail(client, rid, "bad_request", str(exc), False)
            return
        stream = Stream(rid, client, len(msg.prompt_token_ids), prefill_only=msg.prefill_only,
                        hold_s=0.0 if msg.prefill_only else msg.hold_s)
        self._streams[rid] = stream  # before the engine sees it: its outputs look the stream up
        if msg.speculative:
            self._speculative.add(rid)
        preparation = self._loop.engine.preparation(request)
        if preparation is None:
            await self._enter(client, msg, request, stream)
            return
        # A task: this worker's other requests and cancels go on while the preparation runs.
        self._tasks.add(task := asyncio.create_task(self._prepare(client, msg, request, stream, preparation)))
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, client: bytes, msg: GenerateRequest, request: EngineRequest, stream: Stream,
                       preparation: Callable[[], None]) -> None:
        """Run the engine's preparation of a request on a thread, then enter it, unless it was
        cancelled (or the worker stopped) meanwhile."""
        rid = msg.request_id
        try:
            await asyncio.to_thread(preparation)
            if self._streams.get(rid) is stream:
                await self._enter(client, msg, request, stream)
        except DynError as exc:
            if self._streams.get(rid) is stream:
                self._streams.pop(rid)
                self._speculative.discard(rid)
                self._refuse(client, rid, exc)
        except Exception as exc:
            self._handling_failed(client, msg, exc)

    async def _enter(self, client: bytes, msg: GenerateRequest, request: EngineRequest, stream: Stream) -> None:
        """Hand a request to the engine (or its KV import), unless the engine's queue is full."""
        rid = msg.request_id
        imports = msg.kv_source is not None and self.import_kv is not None
        try:
            # One hop to the engine thread for a plain request: check the queue and add it together.
            refusal, num_waiting = await asyncio.wrap_future(self._loop.submit(
                lambda e: _admit(e, None if imports else request, self._max_waiting, msg.speculative)))
        except DynError as exc:
            self._streams.pop(rid, None)
            self._speculative.discard(rid)
            self._refuse(client, rid, exc)
            return
        if refusal is not None:
            self._streams.pop(rid, None)
            self._speculative.discard(rid)
            message, retryable = refusal
            self.speculative_refused += not retryable
            self._fail(client, rid, "overloaded", message, retryable)
            return
        if not msg.speculative and self._speculative and num_waiting > 0:
            # Real work is queueing: speculative prefills give way (they only warm a cache).
            for spec_id in list(self._speculative):
                self.speculative_cancelled += 1
                await self._cancel(spec_id)
        self.requests_total += 1
        # debug: the frontend logs each request's arrival, this worker logs its end (dyn/worker/process.py)
        log.debug("request started: %d prompt tokens%s%s", len(msg.prompt_token_ids),
                  ", prefill only" if msg.prefill_only else "",
                  ", salted" if msg.salt else "", extra={"request_id": rid})
        if not imports:
            return
        log.info("KV pull from %s", _kv_origin(msg.kv_source), extra={"request_id": rid})
        # A task, not awaited here: a pull takes up to shuttle.pull_timeout_s (a prefill worker gone),
        # and meanwhile this worker's other requests and cancels must not wait behind it.
        stream.kv_import = task = asyncio.create_task(self._import(client, stream, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _import(self, client: bytes, stream: Stream, msg: GenerateRequest) -> None:
        rid = msg.request_id
        try:
            await self.import_kv(stream, msg)  # adds the request itself
        except Exception as exc:  # (not a cancel: _cancel aborts it in the engine, freeing its blocks)
            if self._streams.get(rid) is not stream:
                return  # cancelled or failed meanwhile: already answered
            if isinstance(exc, DynError):
                self._streams.pop(rid, None)
                self._refuse(client, rid, exc)
            else:
                self._handling_failed(client, msg, exc)
        finally:
            stream.kv_import = None

    async def _cancel(self, rid: str) -> None:
        """Stop a KV import still under way (awaited, so the same id sent again next starts clean),
        abort in the engine (before its next step), then end the stream with reason abort."""
        self.cancels_total += 1
        self._speculative.discard(rid)
        importing = self._streams.get(rid)
        if importing is not None and importing.kv_import is not None:
            importing.kv_import.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await importing.kv_import
        await asyncio.wrap_future(self._loop.submit(lambda e: e.abort(rid)))
        stream = self._streams.pop(rid, None)
        if stream is not None:
            self._send(stream.client, Finish(rid, "abort", stream.num_prompt_tokens,
                                             stream.num_completion_tokens))

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        """Send what a step (or a burst of steps) produced: every reply to one frontend goes in one
        multipart message, its token chunks first and together in one TokenChunks frame (a batch
        of 32 decoding requests is one send of one frame, not 32), then any Finish or failure
        without tokens, in order (a request's chunk precedes its end)."""
        chunks: dict[bytes, list[dict]] = {}
        replies: dict[bytes, list[bytes]] = {}
        now = 0.0
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.hold_s and stream.num_completion_tokens:
                now = now or time.monotonic()
                out = _hold(stream, out, now)
                if out is None:
                    continue
            stream.num_completion_tokens += len(out.token_ids)
            finish = None
            if out.finished:
                self._streams.pop(out.request_id, None)
                self._speculative.discard(out.request_id)
                exports = stream.prefill_only and self.export_kv is not None and out.finish_reason != "abort"
                if not out.error and not exports:
                    finish = (out.finish_reason or "stop", stream.num_prompt_tokens, stream.num_completion_tokens)
            if out.token_ids:  # the Finish rides on the last chunk
                chunk = token_chunk_fields(out.request_id, list(out.token_ids), out.logprobs,
                                           out.num_cached_tokens, finish, out.top_ids, out.top_logprobs,
                                           out.prompt_logprobs)
                if (batch := chunks.get(stream.client)) is None:
                    chunks[stream.client] = [chunk]
                else:
                    batch.append(chunk)
            elif finish is not None:
                replies.setdefault(stream.client, []).append(REQUEST_CODEC.encode(Finish(out.request_id, *finish)))
            if out.finished and finish is None:
                if out.error:
                    replies.setdefault(stream.client, []).append(
                        REQUEST_CODEC.encode(RequestFailed(out.request_id, "internal", out.error, True)))
                else:
                    asyncio.ensure_future(self._finish_prefill(stream, out))
        for client, batch in chunks.items():
            self._router.send(client, encode_token_chunks(batch), *replies.pop(client, ()))
        for client, frames in replies.items():
            self._router.send(client, *frames)

    async def _finish_prefill(self, stream: Stream, out: TokenOutput) -> None:
        try:
            await self.export_kv(stream, None)  # type: ignore[arg-type]
        except DynError as exc:
            self._fail(stream.client, stream.request_id, "kv_transfer", str(exc), True)
            return
        log.info("KV offer of %d prompt tokens", stream.num_prompt_tokens,
                 extra={"request_id": stream.request_id})
        self._send(stream.client, Finish(stream.request_id, out.finish_reason or "length",
                                         stream.num_prompt_tokens, stream.num_completion_tokens,
                                         kv_offer=stream.kv_offer))

    def _fail(self, client: bytes, rid: str, code: str, message: str, retryable: bool) -> None:
        self._send(client, RequestFailed(rid, code, message, retryable))

    def _refuse(self, client: bytes, rid: str, exc: DynError) -> None:
        """A request the engine refused: a bad one is final, anything else may go to another worker."""
        code = "bad_request" if isinstance(exc, RequestError) else "internal"
        self._fail(client, rid, code, str(exc), code != "bad_request")

    def _send(self, client: bytes, message) -> None:
        self._router.send(client, REQUEST_CODEC.encode(message))


def _hold(stream: Stream, out: TokenOutput, now: float) -> TokenOutput | None:
    """A step's output of a request whose tokens may be kept back (hold_s, after its first token
    went out): None while they are kept, else everything kept so far with this output, to send."""
    held = stream.held
    if held is None:
        if out.finished:
            return out
        stream.held = _copy(out)
        stream.held_since = now
        return None
    _extend(held, out)
    if not out.finished and now - stream.held_since < stream.hold_s:
        return None
    held.finished, held.finish_reason, held.error = out.finished, out.finish_reason, out.error
    stream.held = None
    return held


def _merge_outputs(outputs: list[TokenOutput]) -> list[TokenOutput]:
    """Join each request's consecutive outputs into one (tokens and logprobs in order; the
    finishing output's fields win); nothing joins an output that already finished. Outputs of
    one step (one per request, as a per-step hand-off delivers them) come back as they are."""
    if len({out.request_id for out in outputs}) == len(outputs):
        return outputs
    merged: list[TokenOutput] = []
    last: dict[str, TokenOutput] = {}
    for out in outputs:
        prev = last.get(out.request_id)
        if (prev is None or prev.finished or (prev.logprobs is None) != (out.logprobs is None)
                or (prev.top_ids is None) != (out.top_ids is None)):
            copy = _copy(out)
            copy.finished, copy.finish_reason, copy.error = out.finished, out.finish_reason, out.error
            merged.append(copy)
            last[out.request_id] = copy
            continue
        _extend(prev, out)
        prev.finished, prev.finish_reason, prev.error = out.finished, out.finish_reason, out.error
    return merged


def _copy(out: TokenOutput) -> TokenOutput:
    """A not-finished output with its own lists, to extend with later ones."""
    return TokenOutput(out.request_id, list(out.token_ids), False, None, None,
                       list(out.logprobs) if out.logprobs is not None else None, out.num_cached_tokens,
                       list(out.top_ids) if out.top_ids is not None else None,
                       list(out.top_logprobs) if out.top_logprobs is not None else None, out.prompt_logprobs)


def _extend(into: TokenOutput, out: TokenOutput) -> None:
    """`out`'s tokens (and their logprobs) after `into`'s."""
    into.token_ids.extend(out.token_ids)
    if into.logprobs is not None and out.logprobs is not None:
        into.logprobs.extend(out.logprobs)
    if into.top_ids is not None and out.top_ids is not None:
        into.top_ids.extend(out.top_ids)
        into.top_logprobs.extend(out.top_logprobs)  # type: ignore[union-attr]


def _admit(engine, request: EngineRequest | None, max_waiting: int,
           speculative: bool) -> tuple[tuple[str, bool] | None, int]:
    """On the engine thread: refuse when the queue is full (or, for a speculative prefill, not
    empty), else add `request` (None: the KV import adds it later). Returns (refusal message
    and whether a retry may succeed, or None; the number of requests that were waiting)."""
    num_waiting = engine.num_waiting()
    if num_waiting >= max_waiting:
        return (f"{num_waiting} requests waiting", True), num_waiting
    if speculative and num_waiting > 0:
        return (f"speculative prefill refused: {num_waiting} requests waiting", False), num_waiting
    if request is not None:
        engine.add_request(request)
    return None, num_waiting


def token_chunk_fields(request_id: str, token_ids: list[int], logprobs: list[float] | None,
                       num_cached_tokens: int, finish: tuple[str, int, int] | None = None,
                       top_ids: list[list[int]] | None = None, top_logprobs: list[list[float]] | None = None,
                       prompt_logprobs: PromptLogprobs | None = None) -> dict:
    """A TokenChunk(..., finish=Finish(request_id, *finish)) as the codec reads it, without the
    generic field walk (one of these per token per request). Fields at their default are left
    out (the codec fills them in): the common chunk is 3 fields, not 8, which halves its bytes
    and the receiver's unpacking (measured: a frame of 16 chunks, 15 -> 8 us)."""
    fields: dict = {"request_id": request_id, "token_ids": token_ids, "num_cached_tokens": num_cached_tokens}
    if logprobs is not None:
        fields["logprobs"] = logprobs
    if finish is not None:
        fields["finish"] = {"request_id": request_id, "reason": finish[0], "num_prompt_tokens": finish[1],
                            "num_completion_tokens": finish[2]}
    if top_ids is not None:
        fields["top_ids"], fields["top_logprobs"] = top_ids, top_logprobs
    if prompt_logprobs is not None:
        fields["prompt_logprobs"] = asdict(prompt_logprobs)
    return fields


def encode_token_chunks(chunks: list[dict]) -> bytes:
    """A TokenChunks frame (REQUEST_CODEC decodes it) of `token_chunk_fields` maps."""
    return msgpack.packb([PROTOCOL_VERSION, "token_chunks", {"chunks": chunks}], use_bin_type=True)


def engine_request(msg: GenerateRequest) -> EngineRequest:
    """The engine's view of a wire request (the codec already checked the sampling types; the
    engine checks their values when the request is added); RequestError names a bad retention field."""
    retention = None
    if msg.retention_priority or msg.retention_ttl_s is not None:
        if msg.retention_ttl_s is not None and msg.retention_ttl_s <= 0:
            raise RequestError(f"retention_ttl_s must be > 0, got {msg.retention_ttl_s}",
                               field="retention_ttl_s")
        retention = Retention(msg.retention_priority, msg.retention_ttl_s)
    if msg.retention_blocks is not None and msg.retention_blocks < 0:
        raise RequestError(f"retention_blocks must be >= 0, got {msg.retention_blocks}",
                           field="retention_blocks")
    return EngineRequest(request_id=msg.request_id, prompt_token_ids=list(msg.prompt_token_ids),
                         sampling=msg.sampling, priority=msg.priority, salt=msg.salt,
                         prefill_only=msg.prefill_only, retention=retention,
                         retention_blocks=msg.retention_blocks, session_id=msg.session_id,
                         resumed_tokens=msg.resumed_tokens, adapter=msg.adapter)


def _kv_origin(kv_source: object) -> str:
    """Where a hand-off's KV comes from, for the log: a shuttle address or vLLM's NIXL side channel."""
    if not isinstance(kv_source, dict):
        return "an unreadable offer"
    vllm = kv_source.get("vllm")
    if isinstance(vllm, dict):
        return f"{vllm.get('remote_host')}:{vllm.get('remote_port')} (vLLM NIXL)"
    return str(kv_source.get("address", "an offer without an address"))
