"""What an engine's KV pool tells the layers around it: block events and the lower-tier interface.

Engines emit `KvEvent`s as blocks are stored in or evicted from their pool;
workers publish them to the router, tiers emit their own for blocks they
hold. `LowerTier` is what an engine offloads evicted blocks to and brings
prefix hits back from (host memory, then disk). Both live in kv/ because
they describe KV content, not an engine: engine, router, sim, worker and
the tiers import them from here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal


@dataclass(slots=True)
class KvEvent:
    """A change in what the engine's pool holds, for KV events and tiers."""

    kind: Literal["stored", "removed"]
    block_hashes: list[int]
    parent_hash: int | None = None
    tier: Literal["device", "host", "disk"] = "device"


KvEventListener = Callable[[KvEvent], None]


class LowerTier(ABC):
    """Host-memory / disk tiers below the engine pool (implemented in dyn.kv)."""

    @abstractmethod
    def offload(self, block_hash: int, parent_hash: int | None, view: object, priority: int = 0,
                ttl_s: float | None = None) -> None:
        """Copy an evicted block's payload out of the pool (called before its slot is reused).

        `priority` and `ttl_s` are the block's retention (dyn.kv.retention): lower
        priority goes first under pressure; past `ttl_s` (None: the tier's own
        TTL) the block is dropped with a removal event. Offloading a block the
        tier already holds refreshes its expiry and keeps the higher priority.
        """

    @abstractmethod
    def fetch(self, block_hash: int, dest_view: object) -> bool:
        """Copy a block's payload into `dest_view`; False when absent or corrupt."""

    @abstractmethod
    def contains(self, block_hash: int) -> bool:
        """Whether fetch would likely succeed (cheap, no I/O)."""

    def expire(self) -> int:
        """Drop every expired block (publishing removal events); returns how many, all tiers."""
        return 0

    def release(self, block_hashes: list[int]) -> None:
        """Give the blocks back their default retention (a closed session)."""
