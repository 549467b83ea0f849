"""The paged KV pool's bookkeeping: block ids, reference counts, prefix cache.

The manager never touches KV memory; it hands out block ids and tells its
owner (through callbacks) when a cached block is evicted or stored.

    block states
      free, empty    -> in `_free_empty` (FIFO), no hash
      free, cached   -> in `_free_cached` (RetentionLru: expired first, then lowest
                        retention priority, then least recently used), hash kept,
                        still found by match_prefix; ref 0
      used           -> ref >= 1 (one per sequence holding it); maybe cached

Allocation takes empty blocks first and evicts cached ones only when no empty
block is left. A sequence frees its blocks last-first, so the tail of a
prefix is evicted before its head (a child without its parent is useless).

Retention (dyn.kv.retention): each cached block carries the priority and
expiry its request asked for; low-priority blocks are evicted first and
`expire()` drops free blocks past their expiry with a removal event (they
do not move down a tier: nobody wants them any more).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from dyn.kv.events import KvEvent
from dyn.kv.retention import Retention, RetentionLru

EvictHook = Callable[[int, int, "int | None", int, "float | None"], None]
"""(block_id, block_hash, parent_hash, priority, ttl_s left): called before an evicted
block's slot is reused, so a lower tier keeps its retention."""
EventHook = Callable[[KvEvent], None]


class BlockManager:
    """Fixed pool of `num_blocks` blocks with reference counts and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, on_evict: EvictHook | None = None,
                 on_event: EventHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_evict = on_evict
        self.on_event = on_event
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks
        self._free_empty: deque[int] = deque(range(num_blocks))
        self._free_cached: RetentionLru[int] = RetentionLru()
        self._retention: list[tuple[int, float | None]] = [(0, None)] * num_blocks
        """Per block: (priority, expires_at on `clock`)."""
        self._cache: dict[int, int] = {}
        self.clock = clock
        self.num_evicted = 0
        self.num_expired = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (empty plus evictable cached)."""
        return len(self._free_empty) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_blocks

    def lookup(self, block_hash: int) -> int | None:
        return self._cache.get(block_hash)

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest leading run of `block_hashes` held in the cache."""
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._cache.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def lock(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (prefix hits); they leave the LRU."""
        ref, uncache = self._ref, self._free_cached.remove  # (a prefix hit locks every block of it)
        for block_id in block_ids:
            if not ref[block_id]:
                assert self._hash[block_id] is not None, f"block {block_id} is free and uncached"
                uncache(block_id)
            ref[block_id] += 1

    def allocate(self, num: int) -> list[int]:
        """Take `num` fresh blocks (ref 1), evicting least recently used cached blocks."""
        if num == 0:  # most decode steps: the last block still has room
            return []
        assert num <= self.num_free_blocks, f"allocate({num}) with {self.num_free_blocks} free"
        block_ids: list[int] = []
        evicted: list[int] = []
        now = self.clock()
        for _ in range(num):
            if self._free_empty:
                block_id = self._free_empty.popleft()
            else:
                expired = self._free_cached.pop_expired_one(now)
                block_id = expired if expired is not None else self._free_cached.pop_victim(now)
                assert block_id is not None
                evicted.append(self._evict(block_id, offload=expired is None, now=now))
            self._ref[block_id] = 1
            block_ids.append(block_id)
        if evicted and self.on_event is not None:
            self.on_event(KvEvent("removed", evicted))
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; last-first, so tails are evicted first."""
        ref, hashes, retention = self._ref, self._hash, self._retention  # (every block of a finished request)
        free_empty, add_cached = self._free_empty.append, self._free_cached.add
        for block_id in reversed(block_ids):
            left = ref[block_id] - 1
            assert left >= 0, f"double free of block {block_id}"
            ref[block_id] = left
            if not left:
                if hashes[block_id] is None:
                    free_empty(block_id)
                else:
                    add_cached(block_id, *retention[block_id])

    def retain(self, block_ids: Sequence[int], retention: Retention) -> None:
        """Raise held blocks to `retention` (a later request that hit them asks for more).

        The higher priority and the later expiry win; "no expiry" from a
        priority > 0 retention outlives any TTL, the default one (0, None) none.
        """
        if retention.priority == 0 and retention.ttl_s is None:
            return
        new = (retention.priority, retention.expires_at(self.clock(), None))
        for block_id in block_ids:
            old = self._retention[block_id]
            later = max(_expiry_rank(*old), _expiry_rank(*new))
            self._retention[block_id] = (max(old[0], new[0]),
                                         None if later in (math.inf, -math.inf) else later)
            if block_id in self._free_cached:
                self._free_cached.add(block_id, *self._retention[block_id])

    def release(self, block_hashes: Sequence[int]) -> None:
        """Back to the default retention (priority 0, no expiry): a closed session."""
        for block_hash in block_hashes:
            block_id = self._cache.get(block_hash)
            if block_id is not None:
                self._retention[block_id] = (0, None)
                if block_id in self._free_cached:
                    self._free_cached.add(block_id, 0, None)

    def expire(self) -> int:
        """Drop free cached blocks past their expiry; one `removed` event for all of them."""
        dropped = []
        for block_id in self._free_cached.pop_expired(self.clock()):
            dropped.append(self._evict(block_id, offload=False, now=0.0))
            self._free_empty.append(block_id)
        self.num_expired += len(dropped)
        if dropped and self.on_event is not None:
            self.on_event(KvEvent("removed", dropped))
        return len(dropped)

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int],
                     parent_hash: int | None, retention: Retention | None = None) -> int:
        """Register computed full blocks under their chained hashes; emit `stored` events.

        A hash already cached in another block (two sequences computed the
        same block at once) is skipped: that block stays uncached. Returns
        the number of blocks registered.
        """
        run: list[int] = []
        run_parent: int | None = None
        prev = parent_hash
        num = 0
        kept = (0, None) if retention is None else (retention.priority,
                                                    retention.expires_at(self.clock(), None))
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            if self._hash[block_id] is None and block_hash not in self._cache:
                if not run:
                    run_parent = prev
                self._hash[block_id] = block_hash
                self._parent[block_id] = prev
                self._retention[block_id] = kept
                self._cache[block_hash] = block_id
                run.append(block_hash)
                num += 1
            else:
                assert self._hash[block_id] in (None, block_hash), f"block {block_id} rehashed"
                self._emit_stored(run, run_parent)
                run = []
            prev = block_hash
        self._emit_stored(run, run_parent)
        return num

    def _evict(self, block_id: int, *, offload: bool, now: float) -> int:
        """Uncache a free block; `offload`: hand it to the lower tier with its retention left."""
        block_hash = self._hash[block_id]
        assert block_hash is not None
        if offload and self.on_evict is not None:
            priority, expires_at = self._retention[block_id]
            ttl_left = None if expires_at is None else max(expires_at - now, 0.0)
            self.on_evict(block_id, block_hash, self._parent[block_id], priority, ttl_left)
        del self._cache[block_hash]
        self._hash[block_id] = None
        self._parent[block_id] = None
        self._retention[block_id] = (0, None)
        self.num_evicted += 1
        return block_hash

    def _emit_stored(self, block_hashes: list[int], parent_hash: int | None) -> None:
        if block_hashes and self.on_event is not None:
            self.on_event(KvEvent("stored", block_hashes, parent_hash))


def _expiry_rank(priority: int, expires_at: float | None) -> float:
    if expires_at is not None:
        return expires_at
    return math.inf if priority > 0 else -math.inf
