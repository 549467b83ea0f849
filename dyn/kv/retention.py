"""Eviction order shared by every KV tier: expired first, then lowest retention priority, then LRU.

A block's retention is what a request asked for it (agent hint `retention`,
per-message marks): a priority and an optional absolute expiry on the tier's
clock. The GPU pool, the host tier and the disk tier all order their
evictable blocks with `RetentionLru`, so a hint means the same thing in each.

    levels:  priority -> OrderedDict(key -> expires_at)   (front = least recently used)
    heap:    (expires_at, seq, key), lazily pruned           (soonest expiry on top)

`pop_victim` is O(log n) amortised; `pop_expired` drains every entry whose
expiry has passed (tiers call it from a periodic sweep, so expiry publishes
its removal events even when nothing else touches the tier).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Retention:
    """What a request asks of the blocks it computes: keep them at `priority` for `ttl_s`."""

    priority: int = 0
    """Higher survives memory pressure longer; 0 is the default of every block."""
    ttl_s: float | None = None
    """Seconds the blocks are kept after their last use; None: the tier's default."""

    def expires_at(self, now: float, default_ttl_s: float | None) -> float | None:
        ttl = self.ttl_s if self.ttl_s is not None else default_ttl_s
        return None if ttl is None else now + ttl


DEFAULT_RETENTION = Retention()


class RetentionLru(Generic[K]):
    """Evictable keys with a priority and an optional expiry each."""

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[K, float | None]] = {}
        self._level_of: dict[K, int] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._level_of)

    def __contains__(self, key: object) -> bool:
        return key in self._level_of

    def add(self, key: K, priority: int = 0, expires_at: float | None = None) -> None:
        """Insert (or move) `key` as the most recently used of its priority level."""
        # (an engine adds every block of a finished request: the common case, a key not in
        # yet going to an existing level, is two dict lookups and two stores)
        if key in self._level_of:
            self.remove(key)
        lru = self._levels.get(priority)
        if lru is None:
            lru = self._levels[priority] = OrderedDict()
        lru[key] = expires_at
        self._level_of[key] = priority
        if expires_at is not None:
            heapq.heappush(self._heap, (expires_at, next(self._seq), key))
            if len(self._heap) > 4 * len(self._level_of) + 64:  # drop stale entries
                self._heap = [e for e in self._heap if self.expires_at(e[2]) == e[0]]
                heapq.heapify(self._heap)

    def remove(self, key: K) -> bool:
        level = self._level_of.pop(key, None)
        if level is None:
            return False
        lru = self._levels[level]
        del lru[key]
        if not lru:
            del self._levels[level]
        return True

    def touch(self, key: K) -> None:
        level = self._level_of.get(key)
        if level is not None:
            self._levels[level].move_to_end(key)

    def priority(self, key: K) -> int | None:
        return self._level_of.get(key)

    def expires_at(self, key: K) -> float | None:
        level = self._level_of.get(key)
        return None if level is None else self._levels[level][key]

    def is_expired(self, key: K, now: float) -> bool:
        expires_at = self.expires_at(key)
        return expires_at is not None and now >= expires_at

    def pop_victim(self, now: float) -> K | None:
        """Remove and return the next key to evict (None when empty)."""
        expired = self.pop_expired_one(now)
        if expired is not None:
            return expired
        if not self._levels:
            return None
        level = min(self._levels)
        key = next(iter(self._levels[level]))
        self.remove(key)
        return key

    def pop_expired(self, now: float) -> list[K]:
        """Remove and return every key whose expiry is at or before `now`."""
        out: list[K] = []
        while (key := self.pop_expired_one(now)) is not None:
            out.append(key)
        return out

    def pop_expired_one(self, now: float) -> K | None:
        """Remove and return one key whose expiry has passed (the soonest), else None."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, _, key = heapq.heappop(heap)
            if self.expires_at(key) == expires_at and key in self._level_of:
                self.remove(key)
                return key
        return None
