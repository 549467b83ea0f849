"""WeightServer: a ready worker offers its weight arena to starting peers.

The blocks move on the shuttle (a ShuttleSender over the arena's block
views, so shm/tcp/nixl/cuda_ipc and their checksums come for free); this
module only answers OfferWeights requests, one batch per request, each batch
admitted by the SharePacer so the serving worker keeps its share of
bandwidth for its own requests. The arena is read-only once loaded, so an
offer pins nothing that could change under it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from dyn.control.sockets import BadMessages, Security, receive_routed, server_socket
from dyn.shuttle import SenderConfig, ShuttleSender, TransferError
from dyn.engine.weight_arena import WeightArena
from dyn.weights.manifest import WeightManifest
from dyn.weights.pacing import SharePacer
from dyn.weights.wire import MAX_WEIGHTS_MESSAGE_BYTES, WEIGHTS_CODEC, OfferWeights, WeightsOffered

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 << 20
"""Largest batch one request may ask for (also the pacer's burst)."""


@dataclass(slots=True)
class ServerStats:
    num_offers: int = 0
    num_refused: int = 0
    num_bytes: int = 0
    """Bytes of batches a receiver confirmed."""
    seconds_busy: float = 0.0
    """Offer made -> receiver's Done, summed over batches."""


class WeightServer:
    """Use as `async with WeightServer(arena, manifest, ...)`; `address` is what peers connect to."""

    def __init__(self, arena: WeightArena, manifest: WeightManifest, *, share: float = 1.0,
                 bind_host: str = "127.0.0.1", transports: tuple[str, ...] = ("shm", "tcp"),
                 security: Security | None = None, ctx: zmq.asyncio.Context | None = None,
                 corrupt_once: frozenset[int] = frozenset()) -> None:
        if not manifest.matches_layout(arena.layout):
            raise ValueError("manifest does not describe this arena")
        self.arena = arena
        self.manifest = manifest
        self.stats = ServerStats()
        self.pacer = SharePacer(share, MAX_BATCH_BYTES)
        self._views = arena.block_views()
        self._security = security or Security()
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._bind_host = bind_host
        self._corrupt_once = set(corrupt_once)
        """Test hook: blocks served once from a corrupted copy (the fetcher must catch and refetch)."""
        self._sender = ShuttleSender(manifest.block_bytes, ctx=self._ctx, security=self._security,
                                     config=SenderConfig(address=f"tcp://{bind_host}:0", transports=transports,
                                                         pin_timeout_s=60.0,
                                                         ring_bytes=max(4 * manifest.block_bytes, 32 << 20),
                                                         chunk_bytes=max(manifest.block_bytes, 4 << 20)))
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._bad = BadMessages("weight server")
        self.address = ""

    async def __aenter__(self) -> "WeightServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self._sender.start()
        self._sock = server_socket(self._ctx, zmq.ROUTER, f"tcp://{self._bind_host}:0", self._security,
                                   max_message_bytes=MAX_WEIGHTS_MESSAGE_BYTES)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task = asyncio.create_task(self._serve(), name="weight-server")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._watchers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sender.close()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.term()

    async def _serve(self) -> None:
        assert self._sock is not None
        # One request at a time per server: the pacer orders batches anyway, and a slow
        # receiver holds only its own offer, never the loop.
        while True:
            received = await receive_routed(self._sock, WEIGHTS_CODEC, self._bad)
            if received is None:
                continue
            identity, msg = received
            if not isinstance(msg, OfferWeights):
                self._bad.record(f"unexpected: {type(msg).__name__}")
                continue
            reply = await self._answer(msg)
            await self._sock.send_multipart([identity, WEIGHTS_CODEC.encode(reply)])

    async def _answer(self, req: OfferWeights) -> WeightsOffered:
        m = self.manifest
        if req.key != m.key:
            self.stats.num_refused += 1
            return WeightsOffered(ok=False, reason=f"this worker holds weights {m.key}, not {req.key}")
        bad = [i for i in req.block_idx if not 0 <= i < m.num_blocks]
        if bad or len(set(req.block_idx)) != len(req.block_idx):
            self.stats.num_refused += 1
            return WeightsOffered(ok=False, reason=f"bad block_idx (out of range or repeated): {bad[:5]}")
        num_bytes = len(req.block_idx) * m.block_bytes
        if num_bytes > MAX_BATCH_BYTES:
            self.stats.num_refused += 1
            return WeightsOffered(ok=False, reason=f"batch of {num_bytes} bytes exceeds {MAX_BATCH_BYTES}")
        manifest = m.to_dict() if req.manifest else {}
        if not req.block_idx:
            return WeightsOffered(ok=True, manifest=manifest)
        await self.pacer.acquire(num_bytes)
        views = [self._view(i) for i in req.block_idx]
        try:
            offer = self._sender.offer(f"weights-{self.stats.num_offers}",
                                       [m.block_hashes[i] for i in req.block_idx], views)
        except TransferError as exc:
            self.stats.num_refused += 1
            return WeightsOffered(ok=False, reason=str(exc))
        self.stats.num_offers += 1
        watcher = asyncio.create_task(self._account(offer.delivered, num_bytes, time.perf_counter()))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return WeightsOffered(ok=True, manifest=manifest, offer=offer.descriptor.to_dict())

    async def _account(self, delivered: asyncio.Future[bool], num_bytes: int, started: float) -> None:
        ok = await delivered
        busy_s = time.perf_counter() - started
        if ok:
            self.stats.num_bytes += num_bytes
            self.stats.seconds_busy += busy_s
            self.pacer.record(num_bytes, busy_s)

    def _view(self, index: int) -> object:
        if index not in self._corrupt_once:
            return self._views[index]
        self._corrupt_once.discard(index)
        log.warning("test hook: serving a corrupted copy of weight block %d once", index)
        copy = bytearray(self.arena.host_bytes(index * self.manifest.block_bytes, self.manifest.block_bytes))
        copy[len(copy) // 2] ^= 0xFF
        return memoryview(copy)
