"""ShuttleReceiver: lives in a decode worker and pulls offered KV into its pool.

    kv = backend.begin_import(req, offer.block_hashes)
    try:
        stats = await receiver.pull(offer, kv.missing_idx, kv.dest_views, timeout_s=10)
    except ShuttleError:
        backend.cancel_import(req.request_id)     # prefill locally instead
    else:
        backend.commit_import(req.request_id, first_token)

Every block is checked before and after it lands: its index must be the next
one asked for, its hash the one the offer promised, and its payload either
checksummed (computed on the destination after the copy, against the sender's)
or, on shm, read under a generation fence that did not change across the copy
(dyn.shuttle.wire: shm modes; ReceiverConfig.shm_mode). Any mismatch, a
Reject, a stall or the deadline ends the pull with a
TransferError; the destination views are then partly written and must be
released with cancel_import. Each pull has a socket to itself, so a broken
transfer never touches another request's; a socket whose transfer ended
cleanly is kept for the next pull from the same sender (a connect and its
handshake cost about half the CPU of a small pull), a failed one is closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import zmq
import zmq.asyncio

from dyn.config.recipe import ShuttleSpec
from dyn.control.sockets import Security, client_socket
from dyn.errors import ProtocolError
from dyn.shuttle import cma
from dyn.shuttle.blocks import CHECKSUM, check_views, is_cuda
from dyn.shuttle.errors import TransferError
from dyn.shuttle.hosts import local_host_id
from dyn.shuttle.transports import make_receiver
from dyn.shuttle.transports.base import RecvTransport
from dyn.shuttle.transports.shm import ShmReceiver
from dyn.shuttle.wire import (CODEC, MAX_CONTROL_BYTES, SHM_DIRECT, SHM_MODES, SHM_RING, Blocks, Credit, Done, End,
                              OfferDescriptor, Pull, Reject, Taken)


log = logging.getLogger(__name__)

DEFAULT_CONCURRENT_PULLS = 8
MAX_KEPT_SENDERS = 64
"""Senders this receiver keeps idle sockets to (least recently used ones are closed)."""


@dataclass(slots=True, eq=False)
class _Conn:
    """One pull's DEALER socket, and the transfers it already carried to a clean end."""

    sock: zmq.asyncio.Socket
    finished: deque[str] = field(default_factory=lambda: deque(maxlen=16))


class TransferStats(NamedTuple):
    num_bytes: int
    seconds: float
    transport: str
    num_blocks: int
    shm_mode: str = ""
    """shm: the mode the transfer used (dyn.shuttle.wire.SHM_MODES)."""

    @property
    def gbps(self) -> float:
        """GB/s (1e9 bytes per second) of payload."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    credit_bytes: int = 32 << 20
    """Payload bytes one pull lets the sender have in flight (tcp: buffered here)."""
    stall_timeout_s: float = 5.0
    """A pull that hears nothing from the sender for this long fails."""
    max_concurrent_pulls: int = DEFAULT_CONCURRENT_PULLS
    """With credit_bytes, bounds this side's receive memory."""
    shm_mode: str = SHM_DIRECT
    """The best shm mode to use (dyn.shuttle.wire.SHM_MODES): "direct" (one copy, read from the
    sender's memory), "ring" (through its ring, fenced) or "ring+xxh3_64" (through the ring,
    checksummed as tcp is); a pull uses this one or the next one down that both sides can do."""

    def __post_init__(self) -> None:
        if self.shm_mode not in SHM_MODES:
            raise ValueError(f"shm_mode {self.shm_mode!r} is not one of {list(SHM_MODES)}")

    @classmethod
    def from_spec(cls, spec: ShuttleSpec) -> "ReceiverConfig":
        """Recipe `shuttle.max_inflight_mib` is split over the concurrent pulls."""
        pulls = DEFAULT_CONCURRENT_PULLS
        return cls(credit_bytes=max(1 << 20, (spec.max_inflight_mib << 20) // pulls), max_concurrent_pulls=pulls)


class ShuttleReceiver:
    """Pulls offers; one socket per pull. Use as `async with ShuttleReceiver() as rx`."""

    def __init__(self, *, config: ReceiverConfig = ReceiverConfig(), security: Security | None = None,
                 ctx: zmq.asyncio.Context | None = None, host_id: str | None = None) -> None:
        self.config = config
        self.host_id = host_id or local_host_id()
        self._security = security or Security()
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._slots = asyncio.Semaphore(config.max_concurrent_pulls)
        self._transports: dict[str, RecvTransport] = {}
        self._can_read_direct: bool | None = None
        """Whether this process may use process_vm_readv (probed on the first shm pull)."""
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        """Sockets of cleanly finished pulls, per (sender address, message size limit)."""

    async def __aenter__(self) -> "ShuttleReceiver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.sock.close(linger=200)  # a last Done or Taken may still be queued
        self._idle.clear()
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        if self._own_ctx:
            self._ctx.term()

    def prepare(self, transports: Iterable[str]) -> None:
        """Set transports up ahead of the first pull (a NIXL agent takes ~0.5 s to start)."""
        for name in transports:
            self._transport(name).prepare()

    def pick_transport(self, offer: OfferDescriptor, dest_views: Sequence[object] = ()) -> str:
        """The fastest transport this offer allows from here (the topology's choice may override)."""
        same_host = offer.host_id == self.host_id
        if same_host and "cuda_ipc" in offer.transports and dest_views and is_cuda(dest_views[0]):
            return "cuda_ipc"
        if same_host and "shm" in offer.transports:
            return "shm"
        if "nixl" in offer.transports:
            return "nixl"
        return "tcp"

    async def pull(self, offer: OfferDescriptor, missing_idx: Sequence[int], dest_views: Sequence[object],
                   timeout_s: float, *, transport: str | None = None,
                   expected_hashes: Sequence[int] | None = None) -> TransferStats:
        """Write the payloads of offer blocks `missing_idx` into `dest_views`, verified.

        `expected_hashes`, when given, are the hashes this worker computed
        from the prompt itself; an offer that disagrees is refused up front.
        Raises TransferError (a ShuttleError) on any failure.
        """
        rid = offer.request_id
        missing_idx = list(missing_idx)
        self._check_request(offer, missing_idx, dest_views, expected_hashes)
        name = transport or self.pick_transport(offer, dest_views)
        if name not in offer.transports:
            raise TransferError(f"transport {name!r} not offered (sender serves {offer.transports})",
                                reason="rejected", request_id=rid, peer=offer.address)
        if name in ("shm", "cuda_ipc") and offer.host_id != self.host_id:
            raise TransferError(f"{name} needs one host; receiver is on {self.host_id!r}, sender on "
                                f"{offer.host_id!r}", reason="rejected", request_id=rid, peer=offer.address)
        shm_mode = self._shm_mode(offer, dest_views) if name == "shm" else ""
        deadline = time.monotonic() + timeout_s
        async with self._slots:
            started = time.perf_counter()
            if shm_mode == SHM_DIRECT and offer.direct:
                await self._take_direct(offer, missing_idx, dest_views)
            else:
                await self._run(offer, missing_idx, dest_views, name, shm_mode, deadline)
            seconds = time.perf_counter() - started
        return TransferStats(len(missing_idx) * offer.block_bytes, seconds, name, len(missing_idx), shm_mode)

    def _shm_mode(self, offer: OfferDescriptor, dest_views: Sequence[object]) -> str:
        """The configured shm mode, or the next one down, that the sender serves and this side can do."""
        for mode in SHM_MODES[SHM_MODES.index(self.config.shm_mode):]:
            if mode == SHM_DIRECT:
                if self._can_read_direct is None:
                    self._can_read_direct = cma.receiver_can()
                if not self._can_read_direct or any(map(is_cuda, dest_views)):
                    continue
            if mode in offer.shm_modes:
                return mode
        raise TransferError(f"the sender serves shm modes {offer.shm_modes}; this receiver uses "
                            f"{list(SHM_MODES[SHM_MODES.index(self.config.shm_mode):])}", reason="rejected",
                            request_id=offer.request_id, peer=offer.address)

    def _after_direct_failure(self, exc: TransferError) -> None:
        """A read the kernel refused (another user, a ptrace rule) would fail every later pull too:
        this receiver goes through the ring from now on."""
        if exc.reason == "cma":
            self._can_read_direct = False
            log.warning("direct shm reads refused (%s); using the ring from now on", exc)

    async def _take_direct(self, offer: OfferDescriptor, missing_idx: list[int], dest_views: Sequence[object]) -> None:
        """Read the blocks through the offer's direct plan now (no round trip), then tell the sender
        (Taken), which unpins the offer; on failure too, so it never waits for its pin timeout."""
        mover = self._transport("shm")
        assert isinstance(mover, ShmReceiver)
        ok, reason = False, "aborted"
        try:
            await mover.read_plan(offer.direct, missing_idx, offer.block_hashes, dest_views, offer.block_bytes,
                            offer.request_id)
            ok, reason = True, ""
        except TransferError as exc:
            reason = exc.reason
            self._after_direct_failure(exc)
            raise
        finally:
            key = _conn_key(offer)
            conn = self._connect(key)
            try:
                conn.sock.send(CODEC.encode(Taken(offer_id=offer.offer_id, ok=ok, num_blocks=len(missing_idx),
                                                  reason=reason)), zmq.NOBLOCK)
                self._keep(key, conn, offer.offer_id)
            except zmq.ZMQError:
                conn.sock.close(linger=0)  # the sender's pin timeout releases the offer instead

    async def _run(self, offer: OfferDescriptor, missing_idx: list[int], dest_views: Sequence[object],
                   name: str, shm_mode: str, deadline: float) -> None:
        rid = offer.request_id
        mover = self._transport(name)
        block_bytes = offer.block_bytes
        credit = max(self.config.credit_bytes, block_bytes)
        transfer_id = secrets.token_hex(8)
        key = _conn_key(offer)
        conn = self._connect(key)
        sock = conn.sock
        ok = False
        reason = "aborted"
        try:
            await sock.send(CODEC.encode(Pull(offer_id=offer.offer_id, transfer_id=transfer_id,
                                              missing_idx=missing_idx, transport=name,
                                              credit_bytes=credit, host_id=self.host_id,
                                              shm_mode=shm_mode)))
            pos = 0
            seq = 0
            while True:
                frames = await self._recv(sock, deadline, offer)
                try:
                    msg = CODEC.decode(frames[0].buffer)
                except ProtocolError as exc:
                    raise TransferError(f"bad message from sender: {exc}", reason="protocol",
                                        request_id=rid, peer=offer.address) from None
                if getattr(msg, "transfer_id", None) != transfer_id:
                    if getattr(msg, "transfer_id", None) in conn.finished:
                        continue  # a late word about an earlier transfer on this kept socket
                    raise TransferError("message for another transfer", reason="protocol",
                                        request_id=rid, peer=offer.address)
                if isinstance(msg, Reject):
                    raise TransferError(f"sender refused: {msg.reason}", reason="rejected",
                                        request_id=rid, peer=offer.address)
                if isinstance(msg, End):
                    if msg.num_blocks != len(missing_idx) or pos != len(missing_idx):
                        raise TransferError(f"stream ended after {pos} of {len(missing_idx)} blocks",
                                            reason="partial", request_id=rid, peer=offer.address)
                    ok = True
                    return
                if not isinstance(msg, Blocks):
                    raise TransferError(f"unexpected {type(msg).__name__}", reason="protocol",
                                        request_id=rid, peer=offer.address)
                n = _check_chunk(msg, seq, pos, missing_idx, offer, shm_mode)
                await mover.deliver(msg, frames[1:], dest_views[pos:pos + n], block_bytes, rid)
                pos += n
                seq += 1
                if pos < len(missing_idx):  # after the last chunk, End and Done settle everything
                    await sock.send(CODEC.encode(Credit(transfer_id=transfer_id, num_bytes=n * block_bytes,
                                                        slot=msg.slot)))
        except TransferError as exc:
            reason = exc.reason
            if shm_mode == SHM_DIRECT:
                self._after_direct_failure(exc)
            raise
        except (ValueError, TypeError, OSError, zmq.ZMQError) as exc:
            reason = "internal"
            raise TransferError(f"{type(exc).__name__}: {exc}", reason="internal", request_id=rid,
                                peer=offer.address) from exc
        finally:
            try:
                sock.send(CODEC.encode(Done(transfer_id=transfer_id, ok=ok, reason="" if ok else reason)),
                          zmq.NOBLOCK)
            except zmq.ZMQError:
                ok = False  # the sender's stall timeout releases the offer instead
            if ok:
                self._keep(key, conn, transfer_id)
            else:
                sock.close(linger=500)
            mover.finish(transfer_id)

    def _connect(self, key: tuple[str, int]) -> "_Conn":
        """A kept socket to this sender, or a new one."""
        idle = self._idle.get(key)
        if idle:
            return idle.pop()
        address, max_message_bytes = key
        return _Conn(client_socket(self._ctx, zmq.DEALER, address, self._security,
                                   max_message_bytes=max_message_bytes))

    def _keep(self, key: tuple[str, int], conn: "_Conn", transfer_id: str) -> None:
        """Park a cleanly finished pull's socket; bounded per sender and in senders."""
        conn.finished.append(transfer_id)
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.config.max_concurrent_pulls:
            conn.sock.close(linger=500)
            return
        idle.append(conn)
        self._idle[key] = self._idle.pop(key)  # most recently used last
        while len(self._idle) > MAX_KEPT_SENDERS:  # senders come and go (restarts, scaling)
            for old in self._idle.pop(next(iter(self._idle))):
                old.sock.close(linger=500)

    def _transport(self, name: str) -> RecvTransport:
        if name not in self._transports:
            self._transports[name] = make_receiver(name)
        return self._transports[name]

    async def _recv(self, sock: zmq.asyncio.Socket, deadline: float, offer: OfferDescriptor) -> list[zmq.Frame]:
        remaining = deadline - time.monotonic()
        wait_s = min(remaining, self.config.stall_timeout_s)
        if wait_s <= 0:
            raise TransferError("deadline passed", reason="timeout", request_id=offer.request_id,
                                peer=offer.address)
        try:
            async with asyncio.timeout(wait_s):
                return await sock.recv_multipart(copy=False)
        except TimeoutError:
            what = "deadline passed" if wait_s == remaining else f"sender silent for {wait_s:.1f}s"
            raise TransferError(what, reason="timeout", request_id=offer.request_id,
                                peer=offer.address) from None

    def _check_request(self, offer: OfferDescriptor, missing_idx: list[int], dest_views: Sequence[object],
                       expected_hashes: Sequence[int] | None) -> None:
        rid = offer.request_id
        if offer.checksum != CHECKSUM:
            raise TransferError(f"offer uses checksum {offer.checksum!r}; this worker speaks {CHECKSUM!r}",
                                reason="rejected", request_id=rid, peer=offer.address)
        if not offer.shm_modes:
            raise TransferError("offer declares no shm modes: its sender runs an older dyn "
                                "(run one version on every worker)", reason="rejected", request_id=rid,
                                peer=offer.address)
        if len(missing_idx) != len(dest_views):
            raise TransferError(f"{len(missing_idx)} missing indices but {len(dest_views)} destination views",
                                reason="bad_view", request_id=rid)
        num = len(offer.block_hashes)
        bad = [i for i in missing_idx if not isinstance(i, int) or not 0 <= i < num]
        if bad:
            raise TransferError(f"missing_idx {bad[:5]} out of range for {num} offered blocks",
                                reason="bad_view", request_id=rid)
        if len(set(missing_idx)) != len(missing_idx):
            raise TransferError("missing_idx has duplicates", reason="bad_view", request_id=rid)
        check_views(dest_views, offer.block_bytes, "dest_views", request_id=rid)
        if expected_hashes is not None:
            for i, (want, got) in enumerate(zip(expected_hashes, offer.block_hashes)):
                if want != got:
                    raise TransferError(f"offer hash {got:#x} differs from this prompt's {want:#x}",
                                        reason="hash_mismatch", request_id=rid, block_idx=i)
            if len(expected_hashes) != num:
                raise TransferError(f"offer has {num} blocks, this prompt {len(expected_hashes)}",
                                    reason="hash_mismatch", request_id=rid)


def _conn_key(offer: OfferDescriptor) -> tuple[str, int]:
    """Which idle sockets fit this offer's pulls: same sender, room for a block plus its header."""
    return offer.address, max(MAX_CONTROL_BYTES, offer.block_bytes + 1024)


def _check_chunk(msg: Blocks, seq: int, pos: int, missing_idx: list[int], offer: OfferDescriptor,
                 shm_mode: str) -> int:
    """Validate a chunk's header against what was asked for; return its block count."""
    rid = offer.request_id
    n = len(msg.block_idx)
    if msg.seq != seq or n == 0 or len(msg.block_hashes) != n:
        raise TransferError(f"malformed chunk (seq {msg.seq}, expected {seq})", reason="protocol",
                            request_id=rid, peer=offer.address)
    fenced = shm_mode in (SHM_DIRECT, SHM_RING)
    if (len(msg.checksums) != (0 if fenced else n)) or (msg.generation >= 0) != fenced \
            or (fenced and msg.generation % 2) or (shm_mode == SHM_DIRECT and len(msg.handles) != n):
        raise TransferError(f"chunk {msg.seq} does not carry what {shm_mode or offer.checksum!r} needs "
                            f"({len(msg.checksums)} checksums, generation {msg.generation}, "
                            f"{len(msg.handles)} handles)", reason="protocol", request_id=rid, peer=offer.address)
    if pos + n > len(missing_idx):
        raise TransferError(f"sender sent more than the {len(missing_idx)} blocks asked for",
                            reason="protocol", request_id=rid, peer=offer.address)
    for k, (idx, block_hash) in enumerate(zip(msg.block_idx, msg.block_hashes)):
        if idx != missing_idx[pos + k]:
            raise TransferError(f"got block {idx} where block {missing_idx[pos + k]} was due",
                                reason="protocol", request_id=rid, peer=offer.address, block_idx=idx)
        if block_hash != offer.block_hashes[idx]:
            raise TransferError(f"hash {block_hash:#x} != promised {offer.block_hashes[idx]:#x}",
                                reason="hash_mismatch", request_id=rid, peer=offer.address,
                                block_idx=idx)
    return n
