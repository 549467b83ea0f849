"""Host-memory KV tier: a bounded, pre-faulted slab of block slots.

Evicted device blocks land here; a prefix hit here is copied back into the
engine pool instead of recomputed. When full, the least valuable entry
moves down to the disk tier (or is dropped): expired entries first, then
lower retention priority, then least recently used (dyn.kv.retention).
Expired entries are dropped with a removal event, by `expire()` (the
worker's periodic sweep) or when touched; re-offloading a block refreshes
its expiry.

    slab (num_slots x block_bytes, one allocation, touched at start)
    +--------+--------+--------+-----+
    | slot 0 | slot 1 | slot 2 | ... |
    +--------+--------+--------+-----+
    index: block hash -> slot, parent;  order: RetentionLru (priority, expiry, recency)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dyn.kv.buffers import copy_into
from dyn.kv.events import KvEvent, KvEventListener, LowerTier
from dyn.kv.retention import Retention, RetentionLru


@dataclass(slots=True)
class _Entry:
    slot: int
    parent: int | None


class HostTier(LowerTier):
    def __init__(self, block_bytes: int, capacity_bytes: int, *, below: LowerTier | None = None,
                 ttl_s: float | None = None, listener: KvEventListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_bytes = block_bytes
        self.num_slots = max(0, capacity_bytes // block_bytes) if block_bytes else 0
        self._slab = np.ones((self.num_slots, block_bytes), dtype=np.uint8)  # ones: pre-fault pages
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._entries: dict[int, _Entry] = {}
        self._order: RetentionLru[int] = RetentionLru()
        self._below = below
        self._ttl_s = ttl_s
        self._listener = listener
        self._clock = clock
        self.num_offloaded = 0
        self.num_fetched = 0
        self.num_evicted = 0
        self.num_expired = 0

    def __len__(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def used_bytes(self) -> int:
        return len(self) * self.block_bytes

    @property
    def below(self) -> LowerTier | None:
        return self._below

    def set_listener(self, listener: KvEventListener | None) -> None:
        self._listener = listener

    def offload(self, block_hash: int, parent_hash: int | None, view: object, priority: int = 0,
                ttl_s: float | None = None) -> None:
        if self.num_slots == 0:
            if self._below is not None:
                self._below.offload(block_hash, parent_hash, view, priority, ttl_s)
            return
        now = self._clock()
        expires_at = Retention(priority, ttl_s).expires_at(now, self._ttl_s)
        if block_hash in self._entries:
            if not self._order.is_expired(block_hash, now):
                # Same hash, same content: refresh recency and expiry, keep the higher priority.
                self._order.add(block_hash, max(priority, self._order.priority(block_hash) or 0),
                                expires_at)
                return
            self._drop_expired(block_hash)  # stale: announce its removal, then store it afresh
        if not self._free_slots:
            self._evict_one(now)
        slot = self._free_slots.pop()
        copy_into(self._slab[slot], view)
        self._entries[block_hash] = _Entry(slot, parent_hash)
        self._order.add(block_hash, priority, expires_at)
        self.num_offloaded += 1
        self._emit("stored", block_hash, parent_hash)

    def fetch(self, block_hash: int, dest_view: object) -> bool:
        entry = self._live(block_hash)
        if entry is None:
            return self._below.fetch(block_hash, dest_view) if self._below is not None else False
        copy_into(dest_view, self._slab[entry.slot])
        self._order.touch(block_hash)
        self.num_fetched += 1
        return True

    def contains(self, block_hash: int) -> bool:
        if self._live(block_hash) is not None:
            return True
        return self._below.contains(block_hash) if self._below is not None else False

    def expire(self) -> int:
        num = 0
        for block_hash in self._order.pop_expired(self._clock()):
            self._drop_expired(block_hash)
            num += 1
        return num + (self._below.expire() if self._below is not None else 0)

    def release(self, block_hashes: list[int]) -> None:
        now = self._clock()
        default_expiry = Retention().expires_at(now, self._ttl_s)
        for block_hash in block_hashes:
            if block_hash in self._order:
                self._order.add(block_hash, 0, default_expiry)
        if self._below is not None:
            self._below.release(block_hashes)

    def payload(self, block_hash: int) -> np.ndarray | None:
        """Read-only view of a held block (tests, snapshots)."""
        entry = self._entries.get(block_hash)
        return None if entry is None else self._slab[entry.slot]

    def _live(self, block_hash: int) -> _Entry | None:
        """The entry if held and not expired; an expired one is dropped (with its event)."""
        entry = self._entries.get(block_hash)
        if entry is not None and self._order.is_expired(block_hash, self._clock()):
            self._drop_expired(block_hash)
            return None
        return entry

    def _evict_one(self, now: float) -> None:
        expired = self._order.pop_expired_one(now)
        if expired is not None:
            self._drop_expired(expired)
            return
        block_hash = self._order.pop_victim(now)
        assert block_hash is not None, "full tier with an empty eviction order"
        entry = self._entries[block_hash]
        if self._below is not None:
            self._below.offload(block_hash, entry.parent, self._slab[entry.slot])
        self.num_evicted += 1
        self._remove(block_hash, entry)

    def _drop_expired(self, block_hash: int) -> None:
        self.num_expired += 1
        self._remove(block_hash, self._entries[block_hash])

    def _remove(self, block_hash: int, entry: _Entry) -> None:
        del self._entries[block_hash]
        self._order.remove(block_hash)
        self._free_slots.append(entry.slot)
        self._emit("removed", block_hash, None)

    def _emit(self, kind: str, block_hash: int, parent: int | None) -> None:
        if self._listener is not None:
            self._listener(KvEvent(kind=kind, block_hashes=[block_hash], parent_hash=parent, tier="host"))
