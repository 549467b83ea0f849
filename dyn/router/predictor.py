"""Predicted cache contents for workers that publish no KV events.

After routing a request to such a worker, the router assumes the worker now
holds the prompt's blocks on its device for `ttl_s` (a guess at how long an
LRU cache keeps them). Each later route to it refreshes the blocks it uses.
Time is a parameter (`now`), never read here, so the simulator can drive it
in virtual time.

Expiry is amortised O(1): entries live in an insertion-ordered dict per
worker, refreshed entries move to the end, and expired ones are popped from
the front.
"""

from __future__ import annotations

from typing import Sequence

from dyn.router.index import KvIndex, Overlaps


class PrefixPredictor:
    """A KvIndex whose device entries expire `ttl_s` after their last use."""

    def __init__(self, ttl_s: float = 120.0) -> None:
        if not ttl_s > 0:
            raise ValueError(f"prediction ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._index = KvIndex()
        self._expiry: dict[str, dict[int, float]] = {}

    def find(self, block_hashes: Sequence[int], now: float) -> Overlaps:
        """Predicted leading-block overlap per worker at time `now`."""
        self.expire(now)
        return self._index.find(block_hashes)

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """The worker was given a prompt with these blocks at `now`."""
        expiry = self._expiry.setdefault(worker_id, {})
        deadline = now + self.ttl_s
        for block_hash in block_hashes:
            expiry.pop(block_hash, None)
            expiry[block_hash] = deadline
        self._index.store(worker_id, "device", block_hashes)

    def expire(self, now: float) -> None:
        """Forget every prediction whose deadline is at or before `now`."""
        for worker_id, expiry in self._expiry.items():
            expired = []
            for block_hash, deadline in expiry.items():
                if deadline > now:
                    break
                expired.append(block_hash)
            for block_hash in expired:
                del expiry[block_hash]
            if expired:
                self._index.remove(worker_id, "device", expired)

    def remove_worker(self, worker_id: str) -> None:
        self._expiry.pop(worker_id, None)
        self._index.remove_worker(worker_id)

    def __len__(self) -> int:
        """Distinct block hashes predicted on some worker."""
        return len(self._index)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._expiry.get(worker_id, ()))
