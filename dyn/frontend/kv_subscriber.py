"""Feeds the router's KV index from the workers' KV-event PUB sockets.

One SUB socket connects to every worker. A gap or a restart in a worker's
sequence (or a newly connected worker) triggers a snapshot request, sent
through the request plane by the caller's `request_snapshot`; the answer
comes back through `on_snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import zmq
import zmq.asyncio

from dyn.control.kv_events import KV_EVENT_CODEC, KvEventBatch, KvSnapshot
from dyn.control.sockets import BadMessages, Security, client_socket, decode_or_record
from dyn.errors import DynError
from dyn.router.router import Router
from dyn.router.wire import batch_from_wire, snapshot_from_wire

log = logging.getLogger(__name__)

SnapshotRequester = Callable[[str], Awaitable[None]]
SNAPSHOT_RETRY_S = 2.0
"""Ask again when a snapshot has not arrived after this long (requests can be lost)."""
_MAX_DRAIN = 256
"""Batches taken per wake-up before yielding to the rest of the loop."""


class KvEventSubscriber:
    def __init__(self, ctx: zmq.asyncio.Context, security: Security, router: Router,
                 request_snapshot: SnapshotRequester) -> None:
        self._ctx = ctx
        self._security = security
        self._router = router
        self._request_snapshot = request_snapshot
        self._sock: zmq.asyncio.Socket | None = None
        self._addresses: dict[str, str] = {}
        self._awaiting_snapshot: dict[str, float] = {}
        self.bad = BadMessages("kv events")
        self.batches_applied = 0

    @property
    def worker_ids(self) -> set[str]:
        return set(self._addresses)

    async def connect(self, worker_id: str, address: str) -> None:
        """Follow a worker's events; ask for its snapshot since earlier events were missed."""
        if self._addresses.get(worker_id) == address:
            return
        if worker_id in self._addresses:
            self.disconnect(worker_id)
        if self._sock is None:
            self._sock = client_socket(self._ctx, zmq.SUB, address, self._security)
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            self._sock.connect(address)
        self._addresses[worker_id] = address
        await self._ask_snapshot(worker_id)

    def disconnect(self, worker_id: str) -> None:
        """Forget a worker (gone or replaced): its blocks leave the index."""
        address = self._addresses.pop(worker_id, None)
        if address is not None and self._sock is not None:
            try:
                self._sock.disconnect(address)
            except zmq.ZMQError:
                pass
        self._awaiting_snapshot.pop(worker_id, None)
        self._router.remove_worker(worker_id)

    def on_snapshot(self, msg: KvSnapshot) -> None:
        if msg.worker_id not in self._addresses:
            return
        try:
            fresh = self._router.apply_snapshot(snapshot_from_wire(msg))
        except DynError as exc:
            self.bad.record(str(exc))
            return
        if fresh:
            self._awaiting_snapshot.pop(msg.worker_id, None)

    async def run(self) -> None:
        raw: zmq.Socket | None = None
        while True:
            if self._sock is None:
                await asyncio.sleep(0.05)
                continue
            # Await one batch, then take those already queued without a future each (every
            # worker publishes ~100 batches/s under load; each replica reads them all).
            if raw is None:
                raw = zmq.Socket.shadow(self._sock.underlying)
            data = await self._sock.recv()
            for _ in range(_MAX_DRAIN):
                await self._apply(data)
                try:
                    data = raw.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break

    async def _apply(self, data: bytes) -> None:
        message = decode_or_record(KV_EVENT_CODEC, data, self.bad)
        if not isinstance(message, KvEventBatch):
            if message is not None:
                self.bad.record(f"unexpected {type(message).__name__}")
            return
        if message.worker_id not in self._addresses:
            return
        try:
            result = self._router.apply_events(batch_from_wire(message))
        except DynError as exc:
            self.bad.record(str(exc))
            return
        self.batches_applied += 1
        if result.needs_snapshot:
            await self._ask_snapshot(message.worker_id)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)

    async def _ask_snapshot(self, worker_id: str) -> None:
        asked_at = self._awaiting_snapshot.get(worker_id)
        if asked_at is not None and time.monotonic() - asked_at < SNAPSHOT_RETRY_S:
            return
        self._awaiting_snapshot[worker_id] = time.monotonic()
        try:
            await self._request_snapshot(worker_id)
        except DynError as exc:
            log.warning("snapshot request to %s failed: %s", worker_id, exc)
            self._awaiting_snapshot.pop(worker_id, None)

