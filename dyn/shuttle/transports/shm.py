"""shm: same host, through the sender's pre-faulted ring (dyn.shuttle.ring).

One copy each side: source view -> ring slot (sender), ring slot ->
destination view (receiver). The receiver's Credit names the slot it has
finished with, which frees it; the ring's size bounds the sender's memory
and a full ring is the backpressure.

Integrity ("generation" mode, the default): the slot's generation fence is
checked before and after the receiver's copy, so a plain copy is all the
work per byte. The bytes never leave the host's memory, so the only failures
to catch are a slot rewritten under the receiver (the sender gave up on the
transfer and reused it) and a sender that died mid-write; the fence catches
both. "xxh3_64" mode (on request, and where the fence is not sound) hashes
each block on both sides as tcp does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dyn.shuttle.blocks import copy_checksum, read_block, write_block, write_verified
from dyn.shuttle.errors import TransferError
from dyn.shuttle.ring import ShmAttachments, ShmRing, fence
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.wire import GENERATION, Blocks


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
        ring = self.ring
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
            fenced = job.integrity == GENERATION
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

    def on_credit(self, job: SendJob, slot: int) -> None:
        if slot in job.held_slots:
            job.held_slots.discard(slot)
            self.ring.free(slot)

    def release(self, job: SendJob) -> None:
        for slot in job.held_slots:
            self.ring.free(slot)
        job.held_slots.clear()

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None


class ShmReceiver(RecvTransport):
    name = "shm"

    def __init__(self) -> None:
        self._maps = ShmAttachments()

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                block_bytes: int, request_id: str) -> None:
        if frames or msg.slot < 0:
            raise TransferError(f"shm chunk {msg.seq} without a ring slot", reason="protocol",
                                request_id=request_id)
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
            state = "left mid-write (the sender died or is rewriting it)" if now % 2 else "rewritten"
            raise TransferError(f"ring slot {msg.slot} {state} {when} the copy: generation {now}, "
                                f"chunk promised {msg.generation}", reason="slot_reused",
                                request_id=request_id, block_idx=msg.block_idx[0])

    def close(self) -> None:
        self._maps.close()
