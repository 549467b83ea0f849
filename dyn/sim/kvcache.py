"""Exact KV block accounting of one simulated worker, with an LRU prefix cache.

    capacity = pinned hashed blocks (held by running requests, ref-counted)
             + private blocks      (being computed, or decode output: never shared)
             + cached blocks       (hashed, ref 0, evictable in LRU order)

A block becomes visible (lookup, "stored" event) only once its prefill is
done (`commit`), as in the engine's block manager; evicting a cached block
emits "removed". Events collect in `events` until the simulator hands them
to the router as one KvEventBatch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from dyn.kv.events import KvEvent


class SimKvCache:
    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.private = 0
        self.events: list[KvEvent] = []
        # Net changes since the last take_events (dicts: ordered, O(1) cancel-out).
        self._stored: dict[int, None] = {}
        self._removed: dict[int, None] = {}

    @property
    def num_used(self) -> int:
        """Blocks that cannot be evicted now."""
        return len(self.ref) + self.private

    @property
    def usage(self) -> float:
        return min(self.num_used / self.capacity, 1.0)

    def lookup(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` held (pinned or cached)."""
        ref, lru = self.ref, self.lru
        count = 0
        for h in hashes:
            if h not in ref and h not in lru:
                break
            count += 1
        return count

    def can_reserve(self, hits: Sequence[int], num_new: int) -> bool:
        cached_hits = sum(1 for h in hits if h in self.lru)
        return self.num_used + cached_hits + num_new <= self.capacity

    def reserve(self, hits: Sequence[int], num_new: int) -> None:
        """Pin the cached prefix `hits` and take `num_new` private blocks (caller checked room)."""
        ref, lru = self.ref, self.lru
        for h in hits:
            if h in ref:
                ref[h] += 1
            else:
                del lru[h]
                ref[h] = 1
        self.private += num_new
        self._evict()

    def commit(self, hashes: Sequence[int]) -> None:
        """Private blocks just computed become the hashed blocks `hashes` (pinned)."""
        ref, lru = self.ref, self.lru
        for h in hashes:
            self.private -= 1
            if h in ref:
                ref[h] += 1
            elif h in lru:
                del lru[h]
                ref[h] = 1
            else:
                ref[h] = 1
                if h in self._removed:
                    del self._removed[h]
                else:
                    self._stored[h] = None
        assert self.private >= 0

    def release(self, hashes: Sequence[int], num_private: int) -> None:
        """A request is done with its blocks: hashed ones become cached (tail evicted first)."""
        ref, lru = self.ref, self.lru
        for h in reversed(hashes):
            count = ref[h] - 1
            if count:
                ref[h] = count
            else:
                del ref[h]
                lru[h] = None
        self.private -= num_private
        assert self.private >= 0

    def take_events(self) -> list[KvEvent]:
        out: list[KvEvent] = []
        if self._stored:
            out.append(KvEvent("stored", list(self._stored)))
            self._stored = {}
        if self._removed:
            out.append(KvEvent("removed", list(self._removed)))
            self._removed = {}
        return out

    def clear(self) -> None:
        """The worker stopped: everything goes (the router forgets the worker wholesale)."""
        self.ref.clear()
        self.lru.clear()
        self.private = 0
        self._stored, self._removed = {}, {}

    def _evict(self) -> None:
        lru = self.lru
        over = self.num_used + len(lru) - self.capacity
        while over > 0 and lru:
            h, _ = lru.popitem(last=False)
            if h in self._stored:
                del self._stored[h]
            else:
                self._removed[h] = None
            over -= 1
