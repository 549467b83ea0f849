"""shm: same host, through host memory, in one of three modes (dyn.shuttle.wire).

"direct" (one copy): the receiver copies the sender's pinned blocks straight
into its destination views with process_vm_readv (dyn.shuttle.cma); the
sender does nothing per byte. The offer itself carries the blocks' addresses
and a fence (plan_direct -> OfferDescriptor.direct), so the read starts the
moment the decode worker has the offer, and a Taken message afterwards lets
the sender unpin it; without a plan (every fence slot held) the same read
follows a Pull, with a fence per transfer. Fences live in the sender's fence
table (a small ring of 8-byte slots, only their generations used); the sender
moves one before the blocks it guards are unpinned (and may be reused), and
the receiver checks it is unchanged before and after each read, and that the
sender's pid (held by a pidfd, proven by a token read from its memory) is
still the same live process.

"ring" (two copies): source view -> ring slot (sender), ring slot ->
destination view (receiver). The receiver's Credit names the slot it has
finished with, which frees it; the ring's size bounds the sender's memory
and a full ring is the backpressure. The slot's generation fence is checked
before and after the receiver's copy, so a plain copy is all the work per
byte. The bytes never leave the host's memory, so the failures to catch are
a slot rewritten under the receiver (the sender gave up on the transfer and
reused it) and a sender that died mid-write; the fence catches both.

"ring+xxh3_64": the ring, with each block hashed on both sides as on tcp
(on request, and where the fence is not sound).
"""

from __future__ import annotations

import asyncio
import errno
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from dyn.shuttle import cma
from dyn.shuttle.blocks import copy_checksum, is_cuda, read_block, write_block, write_verified
from dyn.shuttle.errors import TransferError
from dyn.shuttle.ring import ShmAttachments, ShmRing, fence, segment_pid
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.wire import SHM_DIRECT, SHM_RING, Blocks

FENCE_SLOTS = 8192
"""Offers with a direct-read plan plus direct transfers one sender holds at once (one fence
generation each; SenderConfig.max_offers is 4096)."""
MAX_SENDERS = 64
"""Senders a receiver keeps a pidfd to."""
READ_PIECE_BYTES = 16 << 20
"""A direct read runs on the receiver's event loop in pieces of this size (~1 ms each), as ring
slots do: a 1 GiB hand-off never stalls the worker's loop (heartbeats, requests) for its whole copy."""


MIN_SLOTS = 16
"""A ring bigger than MIN_SLOTS x the chunk size gets bigger slots, but never fewer than this
many: slots are what concurrent small transfers share."""
MAX_SLOT_BYTES = 16 << 20
"""Each slot costs a Blocks message, a Credit and an event-loop turn on both sides; 16 MiB
slots instead of 4 MiB cut the receiver's CPU per GB by ~20% at 64 MiB pulls (load ~20:
117 -> 92 ms/GB, interleaved pulls), and larger ones lose more pipelining than they save."""


class ShmSender(SendTransport):
    name = "shm"

    def __init__(self, block_bytes: int, ring_bytes: int, slot_bytes: int) -> None:
        """`slot_bytes` (the sender's chunk size) is the smallest slot; see MIN_SLOTS."""
        slot_bytes = max(slot_bytes, min(MAX_SLOT_BYTES, ring_bytes // MIN_SLOTS))
        blocks_per_slot = max(1, slot_bytes // block_bytes)
        self.slot_bytes = blocks_per_slot * block_bytes
        self._num_slots = max(2, ring_bytes // self.slot_bytes)
        self._ring: ShmRing | None = None
        self._fences: ShmRing | None = None
        self._token = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8).copy()
        """Random bytes in this process's memory: a direct reader reads them first, to prove the
        pid it reads from is this process (not another that reuses the pid, or shares the number
        from another pid namespace)."""

    @property
    def fences(self) -> ShmRing:
        """The direct mode's fence table, created on first use."""
        if self._fences is None:
            self._fences = ShmRing(8, FENCE_SLOTS)
        return self._fences

    @property
    def ring(self) -> ShmRing:
        """Created on first use, so a sender that only serves tcp maps nothing."""
        if self._ring is None:
            self._ring = ShmRing(self.slot_bytes, self._num_slots)
        return self._ring

    def prepare(self) -> None:
        """Nothing up front: a worker that never sends over shm (a decode worker that may
        later flip to prefill) should not hold `max_inflight_mib` of /dev/shm."""

    async def send(self, job: SendJob) -> None:
        if job.shm_mode == SHM_DIRECT:
            await self._send_direct(job)
            return
        ring = self.ring
        fenced = job.shm_mode == SHM_RING
        # A whole slot per message when the receiver's window allows it (fewer round trips).
        job.chunk_bytes = min(self.slot_bytes, max(job.chunk_bytes, job.window_bytes))
        for seq, chunk in enumerate(job.chunks()):
            num_bytes = len(chunk) * job.block_bytes
            await job.spend(num_bytes)
            try:
                slot = await ring.allocate(job.stall_timeout_s)
            except TimeoutError:
                raise TransferError(f"no free shm ring slot for {job.stall_timeout_s:.1f}s "
                                    f"({ring.num_slots} slots of {ring.slot_bytes >> 10} KiB all held)",
                                    reason="timeout", request_id=job.request_id) from None
            job.held_slots.add(slot)
            dest = ring.slot_array(slot)
            sums = []
            ring.begin_write(slot)
            for k, i in enumerate(chunk):
                region = dest[k * job.block_bytes:(k + 1) * job.block_bytes]
                if fenced:
                    np.copyto(region, read_block(job.block_views[i]), casting="no")
                else:
                    sums.append(copy_checksum(region, read_block(job.block_views[i])))
            generation = ring.end_write(slot)
            msg = Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                         block_hashes=[job.block_hashes[i] for i in chunk], checksums=sums,
                         segment=ring.name, slot=slot, offset=ring.slot_offset(slot),
                         generation=generation if fenced else -1)
            await job.send([msg])

    async def _send_direct(self, job: SendJob) -> None:
        fences = self.fences
        try:
            slot = await fences.allocate(job.stall_timeout_s)
        except TimeoutError:
            raise TransferError(f"{fences.num_slots} direct transfers already running for "
                                f"{job.stall_timeout_s:.1f}s", reason="timeout", request_id=job.request_id) from None
        job.fence_slot = slot
        generation = fences.generation(slot)
        job.chunk_bytes = max(job.chunk_bytes, job.window_bytes)  # nothing to pace: a window per message
        for seq, chunk in enumerate(job.chunks()):
            await job.spend(len(chunk) * job.block_bytes)
            handles = []
            for i in chunk:
                if is_cuda(job.block_views[i]):
                    raise TransferError("direct shm reads host memory; block views are on a GPU",
                                        reason="bad_view", request_id=job.request_id)
                handles.append([cma.address_of(job.block_views[i]), job.block_bytes])
            await job.send([Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                                   block_hashes=[job.block_hashes[i] for i in chunk], checksums=[],
                                   segment=fences.name, slot=slot, offset=fences.slot_offset(slot),
                                   generation=generation, handles=handles,
                                   metadata=self._identity())])

    def plan_direct(self, views: Sequence[object], block_bytes: int) -> tuple[int, list[Any]]:
        """(fence slot, OfferDescriptor.direct) for an offer its receiver may read in place without
        a round trip; (-1, []) when every fence slot is held. drop_fence(slot) before unpinning."""
        slot = self.fences.try_allocate()
        if slot is None:
            return -1, []
        fences = self.fences
        addresses = [cma.address_of(view) for view in views]
        return slot, [fences.name, slot, fences.slot_offset(slot), fences.generation(slot),
                      self._identity().hex(), addresses]

    def drop_fence(self, slot: int) -> None:
        """Move a fence (a reader still at work then fails) and free its slot."""
        self.fences.begin_write(slot)
        self.fences.end_write(slot)
        self.fences.free(slot)

    def _identity(self) -> bytes:
        return cma.address_of(self._token).to_bytes(8, "little") + self._token.tobytes()

    def on_credit(self, job: SendJob, slot: int) -> None:
        if slot in job.held_slots:
            job.held_slots.discard(slot)
            self.ring.free(slot)

    def release(self, job: SendJob) -> None:
        """Called before the offer is unpinned: a direct reader still at work sees its fence move."""
        if job.fence_slot >= 0:
            self.drop_fence(job.fence_slot)
            job.fence_slot = -1
        for slot in job.held_slots:
            self.ring.free(slot)
        job.held_slots.clear()

    def close(self) -> None:
        for ring in (self._ring, self._fences):
            if ring is not None:
                ring.close()
        self._ring = self._fences = None


class ShmReceiver(RecvTransport):
    name = "shm"

    def __init__(self) -> None:
        self._maps = ShmAttachments()
        self._targets: dict[str, tuple[cma.Target, bytes]] = {}
        """Per sender (fence table segment): the process, held by a pidfd and proven by its token."""

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                block_bytes: int, request_id: str) -> None:
        if frames or msg.slot < 0:
            raise TransferError(f"shm chunk {msg.seq} without a ring slot", reason="protocol",
                                request_id=request_id)
        if msg.handles:
            await self._read_direct(msg, dest_views, block_bytes, request_id)
            return
        num_bytes = len(msg.block_idx) * block_bytes
        try:
            if msg.generation >= 0:
                region, generations = self._maps.fenced_slot(msg.segment, msg.slot, msg.offset, num_bytes)
            else:
                region, generations = self._maps.region(msg.segment, msg.offset, num_bytes), None
        except (OSError, ValueError) as exc:
            raise TransferError(f"cannot read shm ring {msg.segment!r}: {exc}", reason="protocol",
                                request_id=request_id) from None
        if generations is None:
            for k, (view, idx, expected) in enumerate(zip(dest_views, msg.block_idx, msg.checksums)):
                payload = region[k * block_bytes:(k + 1) * block_bytes]
                write_verified(view, payload, expected, block_idx=idx, request_id=request_id)
            return
        self._check_generation(msg, generations, "before", request_id)
        fence()
        for k, view in enumerate(dest_views):
            write_block(view, region[k * block_bytes:(k + 1) * block_bytes])
        fence()
        self._check_generation(msg, generations, "during", request_id)

    @staticmethod
    def _check_generation(msg: Blocks, generations: np.ndarray, when: str, request_id: str) -> None:
        now = int(generations[msg.slot])
        if now != msg.generation:
            if msg.handles and when == "before":
                raise TransferError("the sender no longer pins this offer (expired, withdrawn or taken)",
                                    reason="rejected", request_id=request_id)
            if msg.handles:
                what = f"transfer fence {msg.slot} moved (the sender ended the transfer, unpinning its blocks)"
            else:
                state = "left mid-write (the sender died or is rewriting it)" if now % 2 else "rewritten"
                what = f"ring slot {msg.slot} {state}"
            raise TransferError(f"{what} {when} the copy: generation {now}, chunk promised {msg.generation}",
                                reason="slot_reused", request_id=request_id, block_idx=msg.block_idx[0])

    async def read_plan(self, plan: list[Any], missing_idx: Sequence[int], block_hashes: Sequence[int],
                  dest_views: Sequence[object], block_bytes: int, request_id: str) -> None:
        """Read an offer's direct plan (OfferDescriptor.direct) into `dest_views`, fenced."""
        try:
            segment, slot, offset, generation, identity, addresses = plan
            msg = Blocks(transfer_id="", seq=0, block_idx=list(missing_idx),
                         block_hashes=[block_hashes[i] for i in missing_idx], checksums=[], segment=str(segment),
                         slot=int(slot), offset=int(offset), generation=int(generation),
                         handles=[[int(addresses[i]), block_bytes] for i in missing_idx],
                         metadata=bytes.fromhex(identity))
            if len(addresses) != len(block_hashes) or msg.generation < 0 or msg.generation % 2:
                raise ValueError("plan does not match the offer")
        except (ValueError, TypeError, IndexError) as exc:
            raise TransferError(f"malformed direct plan: {exc}", reason="protocol", request_id=request_id) from None
        await self._read_direct(msg, dest_views, block_bytes, request_id)

    async def _read_direct(self, msg: Blocks, dest_views: Sequence[object], block_bytes: int, request_id: str) -> None:
        try:
            _, generations = self._maps.fenced_slot(msg.segment, msg.slot, msg.offset, 0)
            cached = self._targets.get(msg.segment)
            if cached is not None and cached[1] == msg.metadata and cached[0].alive():
                target = cached[0]
            else:
                target = self._attach(msg, request_id)
            sources = [(int(address), int(size)) for address, size in msg.handles]
            dests = [(cma.address_of(view), block_bytes) for view in dest_views]
        except (OSError, ValueError, TypeError) as exc:
            raise TransferError(f"cannot read from the sender of shm segment {msg.segment!r}: {exc}",
                                reason="protocol", request_id=request_id) from None
        if any(size != block_bytes for _, size in sources):
            raise TransferError(f"direct chunk {msg.seq} names sources that are not {block_bytes}-byte blocks",
                                reason="protocol", request_id=request_id)
        self._check_generation(msg, generations, "before", request_id)
        fence()
        per_piece = max(1, READ_PIECE_BYTES // block_bytes)
        try:
            for start in range(0, len(dests), per_piece):
                if start:
                    await asyncio.sleep(0)  # the worker's event loop runs between pieces
                cma.read_into(target.pid, dests[start:start + per_piece], sources[start:start + per_piece])
        except cma.CmaError as exc:
            raise TransferError(str(exc), reason="sender_gone" if exc.errno == errno.ESRCH else "cma",
                                request_id=request_id, block_idx=msg.block_idx[0]) from None
        fence()
        self._check_generation(msg, generations, "during", request_id)
        if not target.alive():
            raise TransferError(f"sender pid {target.pid} exited during the read", reason="sender_gone",
                                request_id=request_id, block_idx=msg.block_idx[0])

    def _attach(self, msg: Blocks, request_id: str) -> cma.Target:
        """The sending process, proven by reading the token its chunks name."""
        if len(msg.metadata) != 24:
            raise TransferError(f"direct chunk {msg.seq} does not name the sender's token", reason="protocol",
                                request_id=request_id)
        old = self._targets.pop(msg.segment, None)
        if old is not None:
            old[0].close()
        target = cma.Target(segment_pid(msg.segment))
        token = np.zeros(16, dtype=np.uint8)
        try:
            cma.read_into(target.pid, [(cma.address_of(token), 16)], [(int.from_bytes(msg.metadata[:8], "little"), 16)])
        except cma.CmaError:
            token[:] = 0
        if token.tobytes() != msg.metadata[8:]:
            target.close()
            raise TransferError(f"pid {target.pid} of shm segment {msg.segment!r} is not the sender (another "
                                f"pid namespace?); use shm_mode 'ring'", reason="cma", request_id=request_id)
        if len(self._targets) >= MAX_SENDERS:  # senders restart; don't hold their pidfds forever
            self._targets.pop(next(iter(self._targets)))[0].close()
        self._targets[msg.segment] = (target, msg.metadata)
        return target

    def close(self) -> None:
        for target, _ in self._targets.values():
            target.close()
        self._targets.clear()
        self._maps.close()
