"""Which NVLink domain serves a request, before any worker is chosen: the site-level tier.

At 100 racks one KV index over 2,000 workers is neither needed nor cheap:
a prefix cached in rack 7 is useless to rack 42 (a hand-off between racks
crosses the scale-out network), so each domain's frontend keeps the index
of its own workers, and a thin tier in front picks the domain. It must

  * send the same conversation (and the same hot document) to the same
    domain, or the domain's prefix cache never sees its prefix again;
  * spread load evenly, and move away from a domain that is falling behind.

Bounded-load consistent hashing does both (Mirrokni et al., "Consistent
Hashing with Bounded Loads", 2018): the request's affinity key (the block
hash at `affinity_tokens` into the prompt, or its last full block if
shorter) is placed on a ring of virtual nodes; the first domain clockwise
whose load is within `1 + slack` of the mean takes it. A domain joining or
leaving moves only its own share of keys. Pure data, no I/O, no clock: the
live front tier and the simulator call the same `choose`.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Callable, Iterator, Sequence

from dyn.router.errors import RouteInputError


class DomainBalancer:
    def __init__(self, domains: Sequence[str], *, block_size: int, affinity_tokens: int = 1024,
                 slack: float = 0.25, vnodes: int = 64) -> None:
        if not domains:
            raise RouteInputError("no domains to balance over", field="domains")
        if block_size < 1 or affinity_tokens < block_size:
            raise RouteInputError(f"affinity_tokens {affinity_tokens} must be >= block_size {block_size} >= 1",
                                  field="affinity_tokens")
        if slack < 0:
            raise RouteInputError(f"must be >= 0, got {slack}", field="slack")
        self.domains = tuple(domains)
        self.affinity_blocks = affinity_tokens // block_size
        self.slack = slack
        points = sorted((_point(f"{name}#{v}"), name) for name in self.domains for v in range(vnodes))
        self._ring = [p for p, _ in points]
        self._owner = [name for _, name in points]
        self._next_unkeyed = 0

    def key(self, block_hashes: Sequence[int]) -> int | None:
        """The affinity key of a prompt (None: no full block, nothing worth keeping together)."""
        if not block_hashes:
            return None
        return block_hashes[min(len(block_hashes), self.affinity_blocks) - 1]

    def order(self, key: int | None) -> Iterator[str]:
        """Every domain once, in the key's ring order (its preference list)."""
        if key is None:
            start = self._next_unkeyed
            self._next_unkeyed += 1
        else:
            start = bisect.bisect_left(self._ring, _mix(key))
        seen: set[str] = set()
        owner, n = self._owner, len(self._ring)
        for i in range(n):
            name = owner[(start + i) % n]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self.domains):
                    return

    def choose(self, block_hashes: Sequence[int], load_of: Callable[[str], float],
               mean_load: float) -> str:
        """The first domain in the key's order whose load is at most (1 + slack) x mean (+1, so an
        idle site keeps affinity); the least loaded one when all are above."""
        bound = (1.0 + self.slack) * mean_load + 1.0
        best, best_load = None, float("inf")
        for name in self.order(self.key(block_hashes)):
            load = load_of(name)
            if load <= bound:
                return name
            if load < best_load:
                best, best_load = name, load
        assert best is not None
        return best


def _point(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")


def _mix(key: int) -> int:
    """Spread block hashes (which may be small, dense ints in the simulator) over the ring."""
    return ((key * 0x9E3779B97F4A7C15) ^ (key >> 29)) & 0xFFFFFFFFFFFFFFFF
