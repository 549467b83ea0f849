"""ShuttleSender: lives in a prefill worker and serves its pending KV exports.

    worker                          ShuttleSender                    receiver
    export_kv(rid) -> hashes, views
    offer(rid, hashes, views) ----> pins views, returns Offer
    Offer.descriptor -> frontend -> decode worker ---------------->  Pull
                                    streams blocks (transport)  <--> Credit
                                    End                         ---> Done(ok)
    on_release(rid, ok) <---------- unpins: worker calls release_export

An offer is released exactly once: after the receiver's Done, after a
transfer fails, or when nobody pulled it within pin_timeout_s. Each
transfer runs in its own task, so one broken receiver never stalls another.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from dyn.config.recipe import ShuttleSpec
from dyn.control.sockets import BadMessages, Security, receive_routed, server_socket
from dyn.errors import ProtocolError
from dyn.shuttle import cma
from dyn.shuttle.blocks import CHECKSUM, check_views, is_cuda
from dyn.shuttle.errors import TransferError
from dyn.shuttle.hosts import local_host_id
from dyn.shuttle.ring import FENCE_SOUND
from dyn.shuttle.transports import make_senders
from dyn.shuttle.transports.base import SendJob, SendTransport
from dyn.shuttle.transports.shm import ShmSender
from dyn.shuttle.wire import (CODEC, MAX_CONTROL_BYTES, SHM_DIRECT, SHM_RING, SHM_RING_XXH3, Credit, Done, End,
                              OfferDescriptor, Pull, Reject, Taken)

log = logging.getLogger(__name__)


ReleaseCallback = Callable[[str, bool], None]
"""(request_id, delivered): unpin the export (Backend.release_export)."""


@dataclass(frozen=True, slots=True)
class SenderConfig:
    address: str = "tcp://127.0.0.1:0"
    """Where the ROUTER binds; port 0 picks a free one (see ShuttleSender.address)."""
    pin_timeout_s: float = 30.0
    """An offer nobody pulls within this is released."""
    stall_timeout_s: float = 5.0
    """A transfer with no progress from the receiver for this long is abandoned."""
    chunk_bytes: int = 4 << 20
    """Payload bytes per Blocks message (rounded down to whole blocks)."""
    ring_bytes: int = 64 << 20
    """Size of the shm ring: the sender's whole staging memory for shm."""
    max_offers: int = 4096
    transports: tuple[str, ...] = ("shm", "tcp")
    node: str = ""
    """Topology node and GPUs of this worker, named in every offer so the receiver can choose
    the transport from the topology path (dyn.shuttle.path)."""
    gpus: tuple[int, ...] = ()

    @classmethod
    def from_spec(cls, spec: ShuttleSpec, *, address: str, cuda_available: bool,
                  nixl_available: bool, node: str = "", gpus: tuple[int, ...] = ()) -> "SenderConfig":
        """Recipe `shuttle:` -> sender settings: the ring is the in-flight budget; a forced
        transport is the only one served."""
        if spec.transport != "auto":
            transports: tuple[str, ...] = (spec.transport,)
        else:
            transports = (("cuda_ipc",) if cuda_available else ()) + ("shm", "tcp") + \
                (("nixl",) if nixl_available else ())
        return cls(address=address, ring_bytes=spec.max_inflight_mib << 20, transports=transports,
                   node=node, gpus=tuple(gpus))


@dataclass(slots=True, eq=False)
class Offer:
    """A pinned export. `delivered` resolves True after a good hand-off, False otherwise."""

    descriptor: OfferDescriptor
    block_views: list[object]
    delivered: asyncio.Future[bool]
    expiry: asyncio.TimerHandle | None = None
    busy: bool = False
    fence_slot: int = -1
    """The shm fence of the offer's direct-read plan (moved before the offer is unpinned)."""

    @property
    def request_id(self) -> str:
        return self.descriptor.request_id


@dataclass(slots=True)
class SenderStats:
    num_pulls: int = 0
    num_delivered: int = 0
    num_failed: int = 0
    num_expired: int = 0
    num_rejected: int = 0
    num_bytes: int = 0
    failures: dict[str, int] = field(default_factory=dict)


def fenced_shm_modes() -> tuple[str, ...]:
    """The fenced shm modes this host allows, best first (dyn.shuttle.ring: where the generation
    fence is sound; dyn.shuttle.cma: whether a same-user process may read this one's memory)."""
    if not FENCE_SOUND:
        return ()
    return ((SHM_DIRECT,) if cma.sender_allows() else ()) + (SHM_RING,)


class ShuttleSender:
    """Serves offers over one ROUTER socket; use as `async with ShuttleSender(...)`."""

    def __init__(self, block_bytes: int, *, config: SenderConfig = SenderConfig(),
                 security: Security | None = None, ctx: zmq.asyncio.Context | None = None,
                 host_id: str | None = None, on_release: ReleaseCallback | None = None) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self.block_bytes = block_bytes
        self.config = config
        self.host_id = host_id or local_host_id()
        self.stats = SenderStats()
        self._security = security or Security()
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._on_release = on_release
        self._transports: dict[str, SendTransport] = make_senders(config.transports, block_bytes, config)
        self._offers: dict[str, Offer] = {}
        self._fenced_modes = fenced_shm_modes()
        self._jobs: dict[str, _Running] = {}
        self._bad = BadMessages("shuttle sender")
        self._sock: zmq.asyncio.Socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.address = ""

    async def __aenter__(self) -> "ShuttleSender":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._sock = server_socket(self._ctx, zmq.ROUTER, self.config.address, self._security,
                                   max_message_bytes=MAX_CONTROL_BYTES)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        for transport in self._transports.values():
            await asyncio.to_thread(transport.prepare)
        refusal = cma.sender_refusal() if "shm" in self._transports and FENCE_SOUND else ""
        if refusal:
            log.info("KV hand-offs on this host copy through the shm ring, not direct reads (one copy, "
                     "about twice the speed): %s", refusal)
        self._loop_task = asyncio.create_task(self._serve_forever(), name="shuttle-sender")

    def _shm_modes(self, views: Sequence[object]) -> list[str]:
        """The shm modes an offer of these views is served in, best first ("direct" reads host memory)."""
        fenced = [m for m in self._fenced_modes if m != SHM_DIRECT or not any(map(is_cuda, views))]
        return [*fenced, SHM_RING_XXH3]

    @property
    def num_pinned(self) -> int:
        return len(self._offers)

    def offer(self, request_id: str, block_hashes: Sequence[int], block_views: Sequence[object]) -> Offer:
        """Pin an export for pickup. The views must stay valid until on_release fires."""
        if self._sock is None:
            raise TransferError("sender is not started", reason="closed", request_id=request_id)
        if len(block_hashes) != len(block_views):
            raise TransferError(f"{len(block_hashes)} block hashes but {len(block_views)} block views",
                                reason="bad_view", request_id=request_id)
        for i, h in enumerate(block_hashes):
            if not isinstance(h, int) or not 0 <= h < 1 << 64:
                raise TransferError(f"block_hashes[{i}]={h!r} is not a 64-bit block hash",
                                    reason="bad_view", request_id=request_id)
        check_views(block_views, self.block_bytes, "block_views", request_id=request_id)
        if len(self._offers) >= self.config.max_offers:
            raise TransferError(f"{len(self._offers)} offers already pinned (max_offers="
                                f"{self.config.max_offers}); prefill faster than decode pulls",
                                reason="overloaded", request_id=request_id)
        shm_modes = self._shm_modes(block_views)
        fence_slot, direct = -1, []
        shm = self._transports.get("shm")
        if SHM_DIRECT in shm_modes and isinstance(shm, ShmSender):
            fence_slot, direct = shm.plan_direct(block_views, self.block_bytes)
        desc = OfferDescriptor(request_id=request_id, offer_id=secrets.token_hex(8),
                               block_hashes=list(block_hashes), block_bytes=self.block_bytes,
                               address=self.address, host_id=self.host_id,
                               transports=list(self._transports), checksum=CHECKSUM,
                               shm_modes=shm_modes, direct=direct,
                               node=self.config.node, gpus=list(self.config.gpus))
        loop = asyncio.get_running_loop()
        offer = Offer(desc, list(block_views), loop.create_future(), fence_slot=fence_slot)
        offer.expiry = loop.call_later(self.config.pin_timeout_s, self._expire, desc.offer_id)
        self._offers[desc.offer_id] = offer
        return offer

    def withdraw(self, offer: Offer) -> None:
        """Release an offer now (its request was cancelled); a running transfer is stopped."""
        running = next((r for r in self._jobs.values() if r.offer is offer), None)
        if running is not None:
            running.task.cancel()
        else:
            self._release(offer, False)

    async def close(self) -> None:
        """Stop serving: running transfers are cancelled and every offer released."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        tasks = [running.task for running in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for offer in list(self._offers.values()):
            self._release(offer, False)
        for transport in self._transports.values():
            transport.close()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.term()

    async def _serve_forever(self) -> None:
        assert self._sock is not None
        while True:
            received = await receive_routed(self._sock, CODEC, self._bad)
            if received is None:
                continue
            identity, msg = received
            try:
                await self._handle(identity, msg)
            except Exception as exc:  # a bug met by one message must cost that hand-off, not the sender
                self._bad.record_failure(type(msg).__name__, exc)

    async def _handle(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, Pull):
            await self._on_pull(identity, msg)
        elif isinstance(msg, Credit):
            running = self._jobs.get(msg.transfer_id)
            if running is not None and running.identity == identity:
                if msg.slot >= 0:
                    running.transport.on_credit(running.job, msg.slot)
                running.job.grant(max(0, msg.num_bytes))
        elif isinstance(msg, Taken):
            self._on_taken(msg)
        elif isinstance(msg, Done):
            running = self._jobs.get(msg.transfer_id)
            if running is not None and running.identity == identity:
                if not msg.ok:
                    self._count_failure(msg.reason or "receiver")
                running.on_done(msg)
        elif msg is not None:
            self._bad.record(f"unexpected: {type(msg).__name__}")

    def _on_taken(self, msg: Taken) -> None:
        """A receiver read an offer through its direct plan (or failed to): unpin it."""
        offer = self._offers.get(msg.offer_id)
        if offer is None or offer.busy or offer.fence_slot < 0:
            return
        self.stats.num_pulls += 1
        if msg.ok:
            self.stats.num_bytes += msg.num_blocks * self.block_bytes
        else:
            self._count_failure(msg.reason or "receiver")
        self._release(offer, msg.ok)

    async def _on_pull(self, identity: bytes, pull: Pull) -> None:
        self.stats.num_pulls += 1
        try:
            offer, transport = self._admit(pull)
        except ProtocolError as exc:
            self.stats.num_rejected += 1
            await self._send(identity, [Reject(transfer_id=pull.transfer_id, reason=str(exc))])
            return
        offer.busy = True
        job = SendJob(transfer_id=pull.transfer_id, request_id=offer.request_id,
                      block_idx=list(pull.missing_idx), block_hashes=offer.descriptor.block_hashes,
                      block_views=offer.block_views, block_bytes=self.block_bytes,
                      chunk_bytes=min(self.config.chunk_bytes, pull.credit_bytes),
                      window_bytes=pull.credit_bytes,
                      stall_timeout_s=self.config.stall_timeout_s, shm_mode=pull.shm_mode,
                      send=lambda parts, ident=identity: self._send(ident, parts))
        job.grant(pull.credit_bytes)
        job.done = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run_job(identity, job, offer, transport))
        self._jobs[job.transfer_id] = _Running(job, task, offer, transport, identity)

    def _admit(self, pull: Pull) -> tuple[Offer, SendTransport]:
        if pull.transfer_id in self._jobs:
            raise ProtocolError(f"transfer id {pull.transfer_id!r} is already in use")
        offer = self._offers.get(pull.offer_id)
        if offer is None:
            raise ProtocolError(f"offer {pull.offer_id!r} is unknown, expired or already delivered")
        if offer.busy:
            raise ProtocolError(f"offer {pull.offer_id!r} is already being pulled")
        transport = self._transports.get(pull.transport)
        if transport is None:
            raise ProtocolError(f"transport {pull.transport!r} not served here (serving {list(self._transports)})")
        if pull.transport in ("shm", "cuda_ipc") and pull.host_id != self.host_id:
            raise ProtocolError(f"{pull.transport} needs one host; receiver is on {pull.host_id!r}, "
                                f"sender on {self.host_id!r}")
        served = offer.descriptor.shm_modes if pull.transport == "shm" else [""]
        if pull.shm_mode not in served:
            raise ProtocolError(f"shm mode {pull.shm_mode!r} is not served on {pull.transport} for this "
                                f"offer (serving {served})")
        if pull.credit_bytes < self.block_bytes:
            raise ProtocolError(f"credit_bytes={pull.credit_bytes} is below one block ({self.block_bytes})")
        num = len(offer.descriptor.block_hashes)
        bad = [i for i in pull.missing_idx if not 0 <= i < num]
        if bad:
            raise ProtocolError(f"missing_idx {bad[:5]} out of range for {num} offered blocks")
        if len(set(pull.missing_idx)) != len(pull.missing_idx):
            raise ProtocolError("missing_idx has duplicates")
        return offer, transport

    async def _run_job(self, identity: bytes, job: SendJob, offer: Offer, transport: SendTransport) -> None:
        delivered = False
        try:
            await transport.send(job)
            await self._send(identity, [End(transfer_id=job.transfer_id, num_blocks=len(job.block_idx))])
            assert job.done is not None
            async with asyncio.timeout(self.config.stall_timeout_s):
                done: Done = await job.done
            delivered = done.ok
        except asyncio.CancelledError:
            # Withdrawn, closing, or the receiver gave up: tell it (best effort) instead of going silent.
            self._send_nowait(identity, Reject(transfer_id=job.transfer_id, reason="offer withdrawn"))
            raise
        except TransferError as exc:
            self._count_failure(exc.reason)
            await self._send(identity, [Reject(transfer_id=job.transfer_id, reason=str(exc))])
        except TimeoutError:
            self._count_failure("timeout")
        except Exception:  # a bug or a bad view must cost one hand-off, never the sender
            log.exception("shuttle transfer %s of request %r failed", job.transfer_id, offer.request_id)
            self._count_failure("internal")
            await self._send(identity, [Reject(transfer_id=job.transfer_id, reason="sender internal error")])
        finally:
            transport.release(job)
            self._jobs.pop(job.transfer_id, None)
            if delivered:
                self.stats.num_bytes += len(job.block_idx) * job.block_bytes
            self._release(offer, delivered)

    async def _send(self, identity: bytes, parts: list[object]) -> None:
        if self._sock is None:
            return
        head, *payloads = parts
        await self._sock.send_multipart([identity, CODEC.encode(head), *payloads], copy=False)

    def _send_nowait(self, identity: bytes, msg: Reject) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart([identity, CODEC.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _count_failure(self, reason: str) -> None:
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1

    def _expire(self, offer_id: str) -> None:
        offer = self._offers.get(offer_id)
        if offer is not None and not offer.busy:
            self.stats.num_expired += 1
            self._release(offer, False)

    def _release(self, offer: Offer, delivered: bool) -> None:
        if self._offers.pop(offer.descriptor.offer_id, None) is None:
            return
        if offer.fence_slot >= 0:  # before the views are unpinned: a reader still at work fails
            shm = self._transports["shm"]
            assert isinstance(shm, ShmSender)
            shm.drop_fence(offer.fence_slot)
            offer.fence_slot = -1
        if offer.expiry is not None:
            offer.expiry.cancel()
        if delivered:
            self.stats.num_delivered += 1
        else:
            self.stats.num_failed += 1
        if not offer.delivered.done():
            offer.delivered.set_result(delivered)
        if self._on_release is not None:
            self._on_release(offer.request_id, delivered)


@dataclass(slots=True, eq=False)
class _Running:
    job: SendJob
    task: asyncio.Task[None]
    offer: Offer
    transport: SendTransport
    identity: bytes
    """Only the receiver that asked may grant credit to or end this transfer."""

    def on_done(self, msg: Done) -> None:
        """The receiver finished (or gave up): a still-streaming job stops here."""
        if self.job.done is not None and not self.job.done.done():
            self.job.done.set_result(msg)
        if not msg.ok:
            self.task.cancel()
