"""A brute-force model of worker caches: the oracle the index is tested against."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BruteCaches:
    held: dict[str, dict[str, set[int]]] = field(default_factory=dict)

    def store(self, worker: str, tier: str, hashes: list[int]) -> None:
        self._tiers(worker)[tier].update(hashes)

    def remove(self, worker: str, tier: str, hashes: list[int]) -> None:
        self._tiers(worker)[tier].difference_update(hashes)

    def clear(self, worker: str) -> None:
        self.held.pop(worker, None)

    def snapshot(self, worker: str) -> dict[str, list[int]]:
        return {t: sorted(s) for t, s in self._tiers(worker).items()}

    def overlap(self, worker: str, hashes: list[int]) -> tuple[int, int, int, int]:
        """(blocks, device, host, disk) of the worker's leading run of held blocks."""
        tiers = self.held.get(worker, {})
        counts = {"device": 0, "host": 0, "disk": 0}
        n = 0
        for h in hashes:
            where = [t for t in ("device", "host", "disk") if h in tiers.get(t, ())]
            if not where:
                break
            counts[where[0]] += 1
            n += 1
        return n, counts["device"], counts["host"], counts["disk"]

    def _tiers(self, worker: str) -> dict[str, set[int]]:
        return self.held.setdefault(worker, {"device": set(), "host": set(), "disk": set()})
