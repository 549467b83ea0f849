"""Host-memory KV tier: a bounded, pre-faulted slab of block slots.

Evicted device blocks land here; a prefix hit here is copied back into the
engine pool instead of recomputed. When full, the least valuable entry
moves down to the disk tier (or is dropped): lower priority goes first,
then least recently used; entries past their TTL go before anything else.

    slab (num_slots x block_bytes, one allocation, touched at start)
    +--------+--------+--------+-----+
    | slot 0 | slot 1 | slot 2 | ... |
    +--------+--------+--------+-----+
    index: block hash -> Entry(slot, parent, priority, stored_at)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dyn.kv.buffers import copy_into
from dyn.kv.events import KvEvent, KvEventListener, LowerTier


@dataclass(slots=True)
class _Entry:
    slot: int
    parent: int | None
    priority: int
    stored_at: float


class HostTier(LowerTier):
    def __init__(self, block_bytes: int, capacity_bytes: int, *, below: LowerTier | None = None,
                 ttl_s: float | None = None, listener: KvEventListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_bytes = block_bytes
        self.num_slots = max(0, capacity_bytes // block_bytes) if block_bytes else 0
        self._slab = np.ones((self.num_slots, block_bytes), dtype=np.uint8)  # ones: pre-fault pages
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        # One LRU per priority level: eviction takes the oldest of the lowest level.
        self._lru: dict[int, OrderedDict[int, _Entry]] = {}
        self._below = below
        self._ttl_s = ttl_s
        self._listener = listener
        self._clock = clock
        self.num_offloaded = 0
        self.num_fetched = 0
        self.num_evicted = 0

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

    def offload(self, block_hash: int, parent_hash: int | None, view: object, priority: int = 0) -> None:
        if self.num_slots == 0:
            if self._below is not None:
                self._below.offload(block_hash, parent_hash, view)
            return
        if self._find(block_hash) is not None:
            self._touch(block_hash)
            return
        if not self._free_slots:
            self._evict_one()
        slot = self._free_slots.pop()
        copy_into(self._slab[slot], view)
        self._lru.setdefault(priority, OrderedDict())[block_hash] = _Entry(slot, parent_hash, priority,
                                                                         self._clock())
        self.num_offloaded += 1
        self._emit("stored", block_hash, parent_hash)

    def fetch(self, block_hash: int, dest_view: object) -> bool:
        entry = self._find(block_hash)
        if entry is not None and self._expired(entry):
            self._remove(block_hash, entry)
            entry = None
        if entry is None:
            return self._below.fetch(block_hash, dest_view) if self._below is not None else False
        copy_into(dest_view, self._slab[entry.slot])
        self._touch(block_hash)
        self.num_fetched += 1
        return True

    def contains(self, block_hash: int) -> bool:
        entry = self._find(block_hash)
        if entry is not None and not self._expired(entry):
            return True
        return self._below.contains(block_hash) if self._below is not None else False

    def payload(self, block_hash: int) -> np.ndarray | None:
        """Read-only view of a held block (tests, snapshots)."""
        entry = self._find(block_hash)
        return None if entry is None else self._slab[entry.slot]

    def _find(self, block_hash: int) -> _Entry | None:
        for lru in self._lru.values():
            entry = lru.get(block_hash)
            if entry is not None:
                return entry
        return None

    def _touch(self, block_hash: int) -> None:
        for lru in self._lru.values():
            if block_hash in lru:
                lru.move_to_end(block_hash)
                return

    def _expired(self, entry: _Entry) -> bool:
        return self._ttl_s is not None and self._clock() - entry.stored_at > self._ttl_s

    def _evict_one(self) -> None:
        victim = self._expired_victim() or self._lru_victim()
        block_hash, entry = victim
        if self._below is not None and not self._expired(entry):
            self._below.offload(block_hash, entry.parent, self._slab[entry.slot])
        self.num_evicted += 1
        self._remove(block_hash, entry)

    def _expired_victim(self) -> tuple[int, _Entry] | None:
        if self._ttl_s is None:
            return None
        for level in sorted(self._lru):
            for block_hash, entry in self._lru[level].items():
                if self._expired(entry):
                    return block_hash, entry
                break  # the oldest of each level is the first to expire
        return None

    def _lru_victim(self) -> tuple[int, _Entry]:
        level = min(p for p, lru in self._lru.items() if lru)
        block_hash = next(iter(self._lru[level]))
        return block_hash, self._lru[level][block_hash]

    def _remove(self, block_hash: int, entry: _Entry) -> None:
        del self._lru[entry.priority][block_hash]
        self._free_slots.append(entry.slot)
        self._emit("removed", block_hash, None)

    def _emit(self, kind: str, block_hash: int, parent: int | None) -> None:
        if self._listener is not None:
            self._listener(KvEvent(kind=kind, block_hashes=[block_hash], parent_hash=parent, tier="host"))

