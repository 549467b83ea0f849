"""Free-GPU bookkeeping for placement: one pool per NVLink domain.

A pool is the unit a tensor-parallel group may not leave: an NVLink domain,
or the GPUs of one node that have no NVLink peers. Inside a pool we prefer
one node (best fit, to keep whole nodes free for wide groups) and only span
nodes of a multi-node domain (an NVL72 rack) when no single node fits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dyn.config.topology import Topology

Shard = tuple[str, tuple[int, ...]]
"""(node name, GPU indices on that node)."""


@dataclass(slots=True)
class GpuPool:
    domain: str | None
    """NVLink domain name; None for a node's GPUs without NVLink peers."""
    order: int
    free: dict[str, list[int]]
    """node -> free GPU indices, nodes in topology order."""
    size: dict[str, int]
    roles: Counter = field(default_factory=Counter)
    """Workers of each role placed here, to pair prefill with decode."""

    @property
    def num_free(self) -> int:
        return sum(len(v) for v in self.free.values())

    @property
    def capacity(self) -> int:
        """The widest group this pool could ever hold."""
        return sum(self.size.values()) if self.domain else max(self.size.values())

    @property
    def label(self) -> str:
        return self.domain or f"{next(iter(self.size))} (no NVLink)"

    def can_fit(self, tp: int) -> bool:
        if self.domain is None:
            return any(len(v) >= tp for v in self.free.values())
        return self.num_free >= tp

    def take(self, tp: int) -> list[Shard]:
        """Allocate `tp` GPUs; the caller checked `can_fit`."""
        single = [n for n, v in self.free.items() if len(v) >= tp]
        if single:
            node = min(single, key=lambda n: len(self.free[n]))  # best fit; min() keeps the first on ties
            return [self._take_from(node, tp)]
        assert self.domain is not None and self.num_free >= tp
        shards: list[Shard] = []
        left = tp
        for node in [n for n, v in self.free.items() if v and len(v) == self.size[n]]:
            if left >= len(self.free[node]):
                left -= len(self.free[node])
                shards.append(self._take_from(node, len(self.free[node])))
        while left:
            fits = [n for n, v in self.free.items() if len(v) >= left]
            node = (min(fits, key=lambda n: len(self.free[n])) if fits
                    else max(self.free, key=lambda n: len(self.free[n])))
            count = min(left, len(self.free[node]))
            shards.append(self._take_from(node, count))
            left -= count
        return shards

    def _take_from(self, node: str, count: int) -> Shard:
        taken, self.free[node] = self.free[node][:count], self.free[node][count:]
        return node, tuple(taken)


def build_pools(topology: Topology, used: set[tuple[str, int]] = frozenset()) -> list[GpuPool]:
    """Pools in deterministic order: declared domains, then NVLink-less nodes."""
    pools: list[GpuPool] = []
    in_domain: set[tuple[str, int]] = set()
    for domain in topology.nvlink_domains:
        pool = GpuPool(domain.name, len(pools), {}, {})
        for node, idx in domain.members:
            in_domain.add((node, idx))
            pool.size[node] = pool.size.get(node, 0) + 1
            pool.free.setdefault(node, [])
            if (node, idx) not in used:
                pool.free[node].append(idx)
        pools.append(pool)
    for node in topology.nodes:
        loose = [g.index for g in node.gpus if (node.name, g.index) not in in_domain]
        if loose:
            pools.append(GpuPool(None, len(pools), {node.name: [i for i in loose if (node.name, i) not in used]},
                                 {node.name: len(loose)}))
    return pools
