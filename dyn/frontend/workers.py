"""The frontend's side of the request plane: one DEALER per worker, streams by request id.

The daemon pushes the list of workers (`update_workers`); the pool connects
to each worker's request ROUTER once and multiplexes every request over that
socket. A reader task per worker decodes replies and hands each to the
inbox of its request (dyn.frontend.inbox), so a request costs no socket and no task of
its own. A worker that leaves or fails ends its open streams explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack
import zmq
import zmq.asyncio

from dyn import PROTOCOL_VERSION
from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest
from dyn.control.loop_socket import LoopSocket, plain_context
from dyn.control.requests import (REQUEST_CODEC, Cancel, Finish, GenerateRequest, RequestFailed, TokenChunk,
                                  TokenChunks)
from dyn.control.sockets import BadMessages, Security, client_socket, decode_or_record
from dyn.errors import ProtocolError
from dyn.frontend.inbox import Inbox

log = logging.getLogger(__name__)

DECODE_ROLES = frozenset({"decode", "both"})
PREFILL_ROLES = frozenset({"prefill", "both"})
WORKER_GONE = "worker_gone"
"""Failure code of streams ended because the daemon reported their worker dead or gone."""
DEAD_STATES = frozenset({"failed", "exited", "gave_up", "lost", "starting", "loading"})
"""States in which a worker cannot be serving our streams: they end (and migrate) at once.
(starting/loading: the daemon relaunched it, so the process that held them is gone.)"""
RECOVERING_STATES = frozenset({"pending", "failed", "launching", "starting", "loading"})
"""States of a worker the daemon is bringing (back) up: worth waiting for."""


@dataclass(slots=True)
class WorkerLimits:
    """What the frontend may queue on one worker before pushing back."""

    max_batch_size: int = 64
    max_queue: int = 256


@dataclass(slots=True)
class WorkerHandle:
    id: str
    role: str
    node: str
    address: str
    limits: WorkerLimits
    state: str = "ready"
    gpus: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    """The last heartbeat's metrics: replaced by each update, never edited in place (routing
    keeps each worker's load until this object or the in-flight counts change)."""
    kv_events_address: str | None = None
    """The worker's KV-event PUB socket (None: it publishes none; the router predicts)."""
    nvlink_domain: str | None = None
    """From the daemon's worker list: a prefill/decode pair prefers one domain."""
    in_flight: int = 0
    """Requests this frontend has open on the worker (fresher than heartbeat metrics)."""
    in_flight_tokens: int = 0
    """Prompt tokens of those requests: the router's local estimate of the KV they hold."""
    pending_prefill_tokens: int = 0
    """Prompt tokens of those requests with no token back yet (admission's queue estimate)."""
    peer_in_flight: int = 0
    """Requests the other frontend replicas last said they have open on the worker."""
    peer_in_flight_tokens: int = 0
    last_heard: float = 0.0
    """time.monotonic() of the last message from the worker (stall detection)."""
    sock: LoopSocket | None = None
    """The DEALER to the worker's request ROUTER, driven from the event loop (no asyncio future
    per message: a streamed answer is a message per engine step)."""
    reader: asyncio.Task | None = None

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot: our own excess, or the worker's report if larger."""
        local = self.in_flight + self.peer_in_flight - self.limits.max_batch_size
        return max(local, int(self.metrics.get("num_waiting", 0)), 0)

    @property
    def is_overloaded(self) -> bool:
        return self.queue_depth >= self.limits.max_queue


class WorkerPool:
    """Connections to every known worker; open/send/cancel requests on them."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security,
                 limits: dict[str, WorkerLimits] | None = None) -> None:
        self._ctx = plain_context(ctx)
        """Plain sockets (see WorkerHandle.sock) on the process's context."""
        self._security = security
        self._limits = limits or {}
        self.workers: dict[str, WorkerHandle] = {}
        self._streams: dict[str, _Stream] = {}
        self.bad = BadMessages("frontend request plane")
        self.num_bad_updates = 0
        self.num_cancels_sent = 0
        self.load_changed = asyncio.Event()
        """Set when a stream opens or closes (frontend replicas publish their load on it)."""
        self.on_snapshot: Callable[[KvSnapshot], None] | None = None
        """Receives KvSnapshot answers (they ride the request plane)."""
        self.relaunch_s: float | None = None
        """The daemon's measured relaunch time of a worker (slowest recent failure-to-ready)."""

    def is_recovering(self, roles: frozenset[str]) -> bool:
        """Is a worker of one of `roles` on its way back (failed and relaunching, or starting)?"""
        return any(h.role in roles and h.state in RECOVERING_STATES for h in self.workers.values())

    def update(self, entries: Iterable[Any]) -> None:
        """Apply the daemon's worker list: connect new workers, drop gone ones, refresh state."""
        seen: set[str] = set()
        for entry in entries:
            parsed = _parse_entry(entry)
            if parsed is None:
                self.num_bad_updates += 1
                continue
            wid, role, node, state, address, kv_address, metrics, gpus, domain = parsed
            seen.add(wid)
            handle = self.workers.get(wid)
            if handle is not None and handle.address != address:
                self._remove(wid, "worker moved to a new address")
                handle = None
            if handle is None:
                handle = self.add(wid, role, address, node=node, state=state, gpus=gpus)
            handle.role, handle.state, handle.metrics, handle.gpus = role, state, metrics, gpus
            handle.kv_events_address = kv_address
            handle.nvlink_domain = domain
            if state in DEAD_STATES:
                self._fail_streams(wid, f"the daemon reports the worker {state}")
        for wid in [w for w in self.workers if w not in seen]:
            self._remove(wid, "worker left the deployment")

    def add(self, worker_id: str, role: str, address: str, *, node: str = "", state: str = "ready",
            gpus: tuple[int, ...] = ()) -> WorkerHandle:
        """Connect to one worker (the daemon's update path, and tests without a daemon)."""
        sock = LoopSocket(client_socket(self._ctx, zmq.DEALER, address, self._security))
        handle = WorkerHandle(worker_id, role, node, address, self._limits.get(role, WorkerLimits()),
                              state=state, gpus=gpus, sock=sock)
        handle.reader = asyncio.create_task(self._read(handle), name=f"read-{worker_id}")
        self.workers[worker_id] = handle
        return handle

    async def open(self, worker_id: str, request: GenerateRequest) -> Inbox:
        """Send a request; its TokenChunk/Finish/RequestFailed messages arrive in the inbox."""
        queue = Inbox()
        handle = self.workers.get(worker_id)
        if handle is None:  # relaunched or gone between routing and sending: the caller re-routes
            queue.put_nowait(RequestFailed(request.request_id, WORKER_GONE,
                                           f"worker {worker_id} left the pool before the request was sent", True))
            return queue
        num_tokens = len(request.prompt_token_ids)
        self._streams[request.request_id] = _Stream(worker_id, queue, num_tokens)
        handle.in_flight += 1
        handle.in_flight_tokens += num_tokens
        self.load_changed.set()
        handle.pending_prefill_tokens += num_tokens
        try:
            await handle.sock.send(REQUEST_CODEC.encode(request))
        except zmq.ZMQError as exc:
            self.close_stream(request.request_id)
            queue.put_nowait(RequestFailed(request.request_id, "internal", f"send failed: {exc}", True))
        return queue

    async def send(self, worker_id: str, message) -> bool:
        """Send a one-way request-plane message (CloseSession); False when the worker is gone."""
        handle = self.workers.get(worker_id)
        if handle is None:
            return False
        await handle.sock.send(REQUEST_CODEC.encode(message))
        return True

    async def request_snapshot(self, worker_id: str) -> None:
        """Ask a worker for its KV snapshot; the answer goes to `on_snapshot`."""
        handle = self.workers.get(worker_id)
        if handle is None:
            raise ProtocolError(f"no connection to worker {worker_id!r} for a KV snapshot")
        await handle.sock.send(REQUEST_CODEC.encode(KvSnapshotRequest(worker_id)))

    def close_stream(self, request_id: str, *, cancel: bool = False) -> None:
        """Forget a stream (after its last message, or early with cancel=True to stop the worker)."""
        entry = self._streams.pop(request_id, None)
        if entry is None:
            return
        handle = self.workers.get(entry.worker_id)
        if handle is None:
            return
        handle.in_flight -= 1
        handle.in_flight_tokens -= entry.num_tokens
        self.load_changed.set()
        if entry.awaiting_first:
            handle.pending_prefill_tokens -= entry.num_tokens
        if cancel:
            self.num_cancels_sent += 1
            frame = REQUEST_CODEC.encode(Cancel(request_id))
            # Sent now, not from a task: a migration may re-send the request to this same worker
            # at once, and the old attempt should stop before the new one starts, not beside it.
            try:
                if handle.sock.send_now(frame):
                    return
            except zmq.ZMQError as exc:
                _cancel_not_sent(request_id, handle.id, exc)
                return
            # The worker's queue is full: wait for room (a request sent after it waits behind it).
            sent = asyncio.ensure_future(handle.sock.send(frame))
            sent.add_done_callback(lambda f, rid=request_id, wid=handle.id: _log_send_error(f, rid, wid))

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        for wid in list(self.workers):
            self._remove(wid, "frontend shutting down")

    def _remove(self, worker_id: str, reason: str) -> None:
        handle = self.workers.pop(worker_id, None)
        if handle is None:
            return
        self._fail_streams(worker_id, reason)
        if handle.reader is not None:
            handle.reader.cancel()
        handle.sock.close()

    def _fail_streams(self, worker_id: str, reason: str) -> None:
        for rid, entry in list(self._streams.items()):
            if entry.worker_id == worker_id:
                entry.queue.put_nowait(RequestFailed(rid, WORKER_GONE, f"worker {worker_id}: {reason}", True))

    async def _read(self, handle: WorkerHandle) -> None:
        """Every frame this worker sends, as it comes: all that has arrived in one wake-up, up
        to _MAX_DRAIN before the rest of the loop gets a turn."""
        sock, streams, bad, wid = handle.sock, self._streams, self.bad, handle.id
        drained = 0
        while True:
            frame = sock.try_recv()
            if frame is None:
                drained = 0
                await sock.park(_POLLIN)  # (try_recv has just looked at the events)
                continue
            drained += 1
            if drained == _MAX_DRAIN:
                drained = 0
                await asyncio.sleep(0)
            handle.last_heard = time.monotonic()
            message = _decode(frame.buffer, bad)
            try:
                for message in message.chunks if type(message) is TokenChunks else (message,):
                    rid = getattr(message, "request_id", None)
                    if rid is not None:
                        entry = streams.get(rid)
                        if entry is not None and entry.worker_id == wid:
                            if entry.awaiting_first:
                                entry.awaiting_first = False
                                handle.pending_prefill_tokens -= entry.num_tokens
                            entry.queue.put_nowait(message)
                            if type(message) is TokenChunk and message.finish is not None:
                                entry.queue.put_nowait(message.finish)  # the stream's end, carried along
                    elif isinstance(message, KvSnapshot) and message.worker_id == wid:
                        if self.on_snapshot is not None:
                            self.on_snapshot(message)
                    elif message is not None:
                        bad.record(f"unexpected {type(message).__name__} from {wid}")
            except Exception as exc:  # a bug met by one frame must not silence this worker's streams
                bad.record_failure(f"{type(message).__name__} from {wid}", exc)


@dataclass(slots=True)
class _Stream:
    worker_id: str
    queue: Inbox
    num_tokens: int
    awaiting_first: bool = True
    """No message back yet: its prompt still counts as queued prefill on the worker."""


_MAX_DRAIN = 512
_POLLIN = int(zmq.POLLIN)
_BATCH_FIELDS = frozenset({"chunks"})
_CHUNK_FIELDS = frozenset({"request_id", "token_ids", "logprobs", "num_cached_tokens", "finish", "top_ids",
                           "top_logprobs", "prompt_logprobs"})
_PLAIN_CHUNK_FIELDS = frozenset({"request_id", "token_ids", "num_cached_tokens"})
_INT_ONLY = frozenset({int})
_FINISH_FIELDS = frozenset({"request_id", "reason", "num_prompt_tokens", "num_completion_tokens", "kv_offer"})


def _decode(data: memoryview, bad: BadMessages):
    """REQUEST_CODEC.decode with a fast path for TokenChunks, the frame a worker sends once per
    engine step with each request's tokens of that step.

    The fast path checks exactly what the codec checks for this type (version,
    tag, field names and types); anything else takes the codec's general path.
    """
    try:
        frame = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises several unrelated types; the codec records why
        frame = None
    if type(frame) is list and len(frame) == 3 and frame[1] == "token_chunks" and frame[0] == PROTOCOL_VERSION:
        fields = frame[2]
        if type(fields) is dict and fields.keys() == _BATCH_FIELDS and type(fields["chunks"]) is list:
            chunks = [_chunk(item) for item in fields["chunks"]]
            if None not in chunks:
                return TokenChunks(chunks)
    return decode_or_record(REQUEST_CODEC, data, bad)


def _chunk(fields: Any) -> TokenChunk | None:
    """One chunk of a TokenChunks frame (fast path); None when anything is off (the codec's
    general path then checks the whole frame and says what)."""
    if type(fields) is dict and fields.keys() == _PLAIN_CHUNK_FIELDS:  # (most chunks: tokens, nothing else)
        rid, ids, cached = fields["request_id"], fields["token_ids"], fields["num_cached_tokens"]
        if type(rid) is str and type(ids) is list and type(cached) is int and _INT_ONLY.issuperset(map(type, ids)):
            return TokenChunk(rid, ids, None, cached)
        return None
    if type(fields) is dict and fields.keys() <= _CHUNK_FIELDS and fields.get("top_ids") is None \
            and fields.get("top_logprobs") is None and fields.get("prompt_logprobs") is None:
        # (top and prompt logprobs: rare, the codec checks them)
        rid, ids = fields.get("request_id"), fields.get("token_ids")
        logprobs, cached = fields.get("logprobs"), fields.get("num_cached_tokens", 0)
        finish = _finish(fields.get("finish"))
        if (type(rid) is str and type(ids) is list and _INT_ONLY.issuperset(map(type, ids))
                and type(cached) is int and finish is not False
                and (logprobs is None or (type(logprobs) is list
                                          and all(type(x) in (float, int) for x in logprobs)))):
            if logprobs is not None:
                logprobs = [float(x) for x in logprobs]
            return TokenChunk(rid, ids, logprobs, cached, finish)
    return None


def _finish(fields: Any) -> Finish | None | bool:
    """A chunk's Finish (fast path: plain fields, no KV offer); None when absent, False when
    anything else (the codec's general path then checks it)."""
    if fields is None:
        return None
    if type(fields) is not dict or not fields.keys() <= _FINISH_FIELDS or fields.get("kv_offer") is not None:
        return False
    rid, reason = fields.get("request_id"), fields.get("reason")
    num_prompt, num_completion = fields.get("num_prompt_tokens", 0), fields.get("num_completion_tokens", 0)
    if type(rid) is str and type(reason) is str and type(num_prompt) is int and type(num_completion) is int:
        return Finish(rid, reason, num_prompt, num_completion)
    return False


def _log_send_error(future: asyncio.Future, request_id: str, worker_id: str) -> None:
    if not future.cancelled() and future.exception() is not None:
        _cancel_not_sent(request_id, worker_id, future.exception())


def _cancel_not_sent(request_id: str, worker_id: str, exc: BaseException) -> None:
    # The worker is gone or saturated: it aborts the request itself when it notices.
    log.warning("cancel of %s to %s not sent: %s", request_id, worker_id, exc)


def _parse_entry(entry: Any):
    """Validate one update_workers entry; None when malformed (counted, skipped)."""
    if not isinstance(entry, dict):
        return None
    wid, role, state = entry.get("id"), entry.get("role"), entry.get("state", "ready")
    addresses = entry.get("addresses") or {}
    address = addresses.get("request") if isinstance(addresses, dict) else None
    if not (isinstance(wid, str) and isinstance(role, str) and isinstance(state, str)
            and isinstance(address, str) and address.startswith("tcp://")):
        return None
    metrics = entry.get("metrics") or {}
    if not isinstance(metrics, dict):
        metrics = {}
    metrics = {k: float(v) for k, v in metrics.items()
               if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    gpus = entry.get("gpus") or ()
    gpus = tuple(g for g in gpus if isinstance(g, int)) if isinstance(gpus, (list, tuple)) else ()
    node = entry.get("node") if isinstance(entry.get("node"), str) else ""
    kv_address = addresses.get("kv_events")
    kv_address = kv_address if isinstance(kv_address, str) and kv_address.startswith("tcp://") else None
    domain = entry.get("nvlink_domain") if isinstance(entry.get("nvlink_domain"), str) else None
    return wid, role, node, state, address, kv_address, metrics, gpus, domain
