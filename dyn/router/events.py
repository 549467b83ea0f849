"""KV event batches from workers, applied to a KvIndex in sequence order.

Each worker numbers its batches 0, 1, 2, ... within one `epoch` (an id that
changes whenever the worker process restarts). Delivery is PUB/SUB, so
batches can be lost but not reordered. The tracker applies batches and tells
the subscriber when it must fetch a snapshot:

    batch seq == expected          apply
    batch seq <  expected          duplicate: ignore
    batch seq >  expected          gap: apply (best effort), buffer, ask for snapshot
    new epoch                      restart: drop the worker's blocks; seq must be 0,
                                   else it is also a gap

A snapshot taken at `seq` replaces the worker's contents; buffered batches
newer than `seq` are then re-applied, so events that raced the snapshot are
not lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from dyn.kv.events import KvEvent
from dyn.router.errors import KvEventError
from dyn.router.index import TIERS, KvIndex, Tier

MAX_BUFFERED_BATCHES = 4096
"""Batches kept per worker while a snapshot is awaited; past this, the oldest go."""

ApplyStatus = Literal["applied", "duplicate", "gap", "restart"]


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """One message on the KV event plane."""

    worker_id: str
    seq: int
    events: Sequence[KvEvent]
    epoch: int = 0
    """Grows when the worker restarts (e.g. its start time in ns); older epochs are stale."""


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """A worker's whole cache contents as of batch `seq` (-1: before any batch)."""

    worker_id: str
    seq: int
    blocks: Mapping[Tier, Sequence[int]]
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class ApplyResult:
    status: ApplyStatus
    needs_snapshot: bool
    """True while the worker's contents are uncertain: fetch and apply a snapshot."""


@dataclass(slots=True)
class _WorkerStream:
    epoch: int
    expected_seq: int
    needs_snapshot: bool = False
    buffered: deque[KvEventBatch] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED_BATCHES))


class KvEventTracker:
    """Applies event batches and snapshots to an index, per worker, in order."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self._streams: dict[str, _WorkerStream] = {}

    def apply_batch(self, batch: KvEventBatch) -> ApplyResult:
        """Apply one batch; raises KvEventError (nothing applied) when malformed."""
        _validate_batch(batch)
        stream = self._streams.get(batch.worker_id)
        status: ApplyStatus = "applied"
        if stream is not None and batch.epoch < stream.epoch:
            return ApplyResult("duplicate", stream.needs_snapshot)
        if stream is None or stream.epoch != batch.epoch:
            if stream is not None:
                status = "restart"
                self.index.remove_worker(batch.worker_id)
            stream = _WorkerStream(epoch=batch.epoch, expected_seq=0)
            self._streams[batch.worker_id] = stream
        if batch.seq < stream.expected_seq:
            return ApplyResult("duplicate", stream.needs_snapshot)
        if batch.seq > stream.expected_seq:
            stream.needs_snapshot = True
            if status == "applied":
                status = "gap"
        if stream.needs_snapshot:
            stream.buffered.append(batch)
        self._apply_events(batch)
        stream.expected_seq = batch.seq + 1
        return ApplyResult(status, stream.needs_snapshot)

    def apply_snapshot(self, snapshot: KvSnapshot) -> bool:
        """Replace the worker's contents, then replay buffered batches newer than it.

        Returns False (nothing changed) for a snapshot too old to use: one from
        an earlier epoch, or older than batches already applied and no longer
        buffered; the caller should ask again.
        """
        for tier in snapshot.blocks:
            if tier not in TIERS:
                raise KvEventError(f"unknown tier {tier!r} in snapshot (expected one of {TIERS})",
                                   worker_id=snapshot.worker_id, seq=snapshot.seq, field="blocks")
        stream = self._streams.get(snapshot.worker_id)
        if stream is not None and snapshot.epoch < stream.epoch:
            return False
        if stream is None or snapshot.epoch > stream.epoch:
            self.index.remove_worker(snapshot.worker_id)
            stream = _WorkerStream(epoch=snapshot.epoch, expected_seq=snapshot.seq + 1)
            self._streams[snapshot.worker_id] = stream
        else:
            # The snapshot must cover every batch we applied but did not buffer.
            oldest_needed = stream.buffered[0].seq if stream.buffered else stream.expected_seq
            if snapshot.seq + 1 < oldest_needed:
                return False
        self.index.replace_worker(snapshot.worker_id, snapshot.blocks)
        replay = [b for b in stream.buffered if b.seq > snapshot.seq]
        expected = snapshot.seq + 1
        contiguous = True
        for batch in replay:
            contiguous = contiguous and batch.seq == expected
            self._apply_events(batch)
            expected = batch.seq + 1
        stream.expected_seq = max(stream.expected_seq, expected)
        stream.buffered.clear()
        stream.needs_snapshot = not contiguous
        return True

    def remove_worker(self, worker_id: str) -> None:
        """The worker is gone: forget its blocks and its sequence state."""
        self._streams.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def needs_snapshot(self, worker_id: str) -> bool:
        stream = self._streams.get(worker_id)
        return stream is not None and stream.needs_snapshot

    def expected_seq(self, worker_id: str) -> int | None:
        """The next sequence number expected from the worker (None: never heard of)."""
        stream = self._streams.get(worker_id)
        return None if stream is None else stream.expected_seq

    def is_known(self, worker_id: str) -> bool:
        """Whether any event or snapshot came from this worker (it publishes events)."""
        return worker_id in self._streams

    def _apply_events(self, batch: KvEventBatch) -> None:
        index = self.index
        for event in batch.events:
            if event.kind == "stored":
                index.store(batch.worker_id, event.tier, event.block_hashes)
            else:
                index.remove(batch.worker_id, event.tier, event.block_hashes)


def _validate_batch(batch: KvEventBatch) -> None:
    if type(batch.seq) is not int or batch.seq < 0:
        raise KvEventError(f"sequence number must be an int >= 0, got {batch.seq!r}",
                           worker_id=batch.worker_id, field="seq")
    for idx, event in enumerate(batch.events):
        if event.kind not in ("stored", "removed"):
            raise KvEventError(f"unknown kind {event.kind!r} (expected 'stored' or 'removed')",
                               worker_id=batch.worker_id, seq=batch.seq, event_idx=idx, field="kind")
        if event.tier not in TIERS:
            raise KvEventError(f"unknown tier {event.tier!r} (expected one of {TIERS})",
                               worker_id=batch.worker_id, seq=batch.seq, event_idx=idx, field="tier")
        hashes = event.block_hashes
        if not isinstance(hashes, (list, tuple)) or not all(type(h) is int for h in hashes):
            raise KvEventError("block_hashes must be a list of ints",
                               worker_id=batch.worker_id, seq=batch.seq, event_idx=idx,
                               field="block_hashes")
