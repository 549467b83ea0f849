"""Which workers hold which KV blocks, and in which tier: pure data, no I/O.

Block hashes chain their parent (dyn.kv.hashing), so equal hash means equal
prefix and a flat dict is enough; no tree is needed:

    _any   : block_hash -> bitmask of workers holding it in any tier
    _host  : block_hash -> bitmask of workers holding it in host memory
    _disk  : block_hash -> bitmask of workers holding it on disk
    _held[bit] = (device_set, host_set, disk_set)   per worker, for removal

Every worker gets one bit (reused after it leaves). A lookup walks the
prompt's hashes and ANDs the masks, stopping when no worker is left, so it
costs O(prompt blocks + workers), whatever the number of indexed blocks.
The device mask is not stored: a block in `_any` but in neither lower-tier
mask of a worker is on its device; the rare lower-tier hits are checked
against the per-worker sets.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, NamedTuple, Sequence

Tier = Literal["device", "host", "disk"]
TIERS: tuple[Tier, ...] = ("device", "host", "disk")
_TIER_IDX = {name: idx for idx, name in enumerate(TIERS)}


class Overlaps(NamedTuple):
    """Leading prompt blocks each worker holds (workers with none are absent).

    `host_hits` / `disk_hits` count the blocks of that prefix found only in a
    lower tier (device hits = blocks - host - disk).
    """

    blocks: dict[str, int]
    host_hits: dict[str, int]
    disk_hits: dict[str, int]

    def tier_hits(self, worker_id: str) -> tuple[int, int, int]:
        """(device, host, disk) blocks of the worker's cached prefix."""
        total = self.blocks.get(worker_id, 0)
        host = self.host_hits.get(worker_id, 0)
        disk = self.disk_hits.get(worker_id, 0)
        return total - host - disk, host, disk


EMPTY_OVERLAPS = Overlaps({}, {}, {})


class KvIndex:
    """Block hash -> holders per tier, for many workers."""

    def __init__(self) -> None:
        self._any: dict[int, int] = {}
        self._host: dict[int, int] = {}
        self._disk: dict[int, int] = {}
        self._bit_of: dict[str, int] = {}
        self._worker_of: list[str | None] = []
        self._free_bits: list[int] = []
        self._held: list[tuple[set[int], set[int], set[int]]] = []

    # ---- queries -------------------------------------------------------

    def find(self, block_hashes: Sequence[int]) -> Overlaps:
        """Per worker, how many leading blocks of `block_hashes` it holds (any tier)."""
        if not block_hashes:
            return EMPTY_OVERLAPS
        any_get = self._any.get
        active = any_get(block_hashes[0], 0)
        if not active:
            return EMPTY_OVERLAPS
        check_lower = bool(self._host or self._disk)
        host_get, disk_get = self._host.get, self._disk.get
        lower_hits: list[tuple[int, int]] = []
        blocks: dict[str, int] = {}
        worker_of = self._worker_of
        idx = 0
        for idx, block_hash in enumerate(block_hashes):
            mask = any_get(block_hash, 0) & active if idx else active
            if mask != active:
                _record(blocks, worker_of, active & ~mask, idx)
                if not mask:
                    break
                active = mask
            if check_lower:
                lower = (host_get(block_hash, 0) | disk_get(block_hash, 0)) & active
                if lower:
                    lower_hits.append((block_hash, lower))
        else:
            _record(blocks, worker_of, active, len(block_hashes))
        if not lower_hits:
            return Overlaps(blocks, {}, {})
        return self._tier_breakdown(blocks, lower_hits)

    def holders(self, block_hash: int) -> dict[str, Tier]:
        """Workers holding one block, with the best tier each holds it in."""
        out: dict[str, Tier] = {}
        mask = self._any.get(block_hash, 0)
        while mask:
            low = mask & -mask
            bit = low.bit_length() - 1
            mask ^= low
            sets = self._held[bit]
            tier = next(TIERS[i] for i in range(3) if block_hash in sets[i])
            out[self._worker_of[bit]] = tier  # type: ignore[index]
        return out

    def num_blocks(self, worker_id: str) -> dict[Tier, int]:
        """Blocks the worker holds per tier (zeros for an unknown worker)."""
        bit = self._bit_of.get(worker_id)
        if bit is None:
            return {tier: 0 for tier in TIERS}
        return {tier: len(s) for tier, s in zip(TIERS, self._held[bit])}

    def blocks_of(self, worker_id: str) -> dict[Tier, frozenset[int]]:
        """A copy of the worker's block hashes per tier."""
        bit = self._bit_of.get(worker_id)
        if bit is None:
            return {tier: frozenset() for tier in TIERS}
        return {tier: frozenset(s) for tier, s in zip(TIERS, self._held[bit])}

    @property
    def worker_ids(self) -> list[str]:
        return list(self._bit_of)

    def __len__(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._any)

    # ---- updates -------------------------------------------------------

    def store(self, worker_id: str, tier: Tier, block_hashes: Iterable[int]) -> None:
        """The worker now holds these blocks in `tier` (idempotent)."""
        bit = self._bit_for(worker_id)
        held = self._held[bit][_TIER_IDX[tier]]
        flag = 1 << bit
        any_ = self._any
        tier_map = self._host if tier == "host" else self._disk if tier == "disk" else None
        for block_hash in block_hashes:
            if block_hash in held:
                continue
            held.add(block_hash)
            any_[block_hash] = any_.get(block_hash, 0) | flag
            if tier_map is not None:
                tier_map[block_hash] = tier_map.get(block_hash, 0) | flag

    def remove(self, worker_id: str, tier: Tier, block_hashes: Iterable[int]) -> None:
        """The worker dropped these blocks from `tier` (unknown ones are ignored)."""
        bit = self._bit_of.get(worker_id)
        if bit is None:
            return
        sets = self._held[bit]
        tier_idx = _TIER_IDX[tier]
        held = sets[tier_idx]
        others = [s for i, s in enumerate(sets) if i != tier_idx]
        tier_map = self._host if tier == "host" else self._disk if tier == "disk" else None
        keep = ~(1 << bit)
        for block_hash in block_hashes:
            if block_hash not in held:
                continue
            held.discard(block_hash)
            if tier_map is not None:
                _clear(tier_map, block_hash, keep)
            if block_hash not in others[0] and block_hash not in others[1]:
                _clear(self._any, block_hash, keep)

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything the worker holds (it died, restarted or left)."""
        bit = self._bit_of.pop(worker_id, None)
        if bit is None:
            return
        keep = ~(1 << bit)
        device, host, disk = self._held[bit]
        for block_hash in device | host | disk:
            _clear(self._any, block_hash, keep)
        for block_hash in host:
            _clear(self._host, block_hash, keep)
        for block_hash in disk:
            _clear(self._disk, block_hash, keep)
        self._held[bit] = (set(), set(), set())
        self._worker_of[bit] = None
        self._free_bits.append(bit)

    def replace_worker(self, worker_id: str, blocks: Mapping[Tier, Iterable[int]]) -> None:
        """Make the worker's contents exactly `blocks` (a snapshot)."""
        self.remove_worker(worker_id)
        self._bit_for(worker_id)
        for tier, hashes in blocks.items():
            self.store(worker_id, tier, hashes)

    # ---- helpers -------------------------------------------------------

    def _bit_for(self, worker_id: str) -> int:
        bit = self._bit_of.get(worker_id)
        if bit is not None:
            return bit
        # Lowest free bit keeps masks short (small ints are faster).
        if self._free_bits:
            self._free_bits.sort(reverse=True)
            bit = self._free_bits.pop()
            self._worker_of[bit] = worker_id
        else:
            bit = len(self._worker_of)
            self._worker_of.append(worker_id)
            self._held.append((set(), set(), set()))
        self._bit_of[worker_id] = bit
        return bit

    def _tier_breakdown(self, blocks: dict[str, int], lower_hits: list[tuple[int, int]]) -> Overlaps:
        host_hits: dict[str, int] = {}
        disk_hits: dict[str, int] = {}
        for block_hash, mask in lower_hits:
            while mask:
                low = mask & -mask
                bit = low.bit_length() - 1
                mask ^= low
                device, host, _ = self._held[bit]
                if block_hash in device:
                    continue
                worker_id = self._worker_of[bit]
                target = host_hits if block_hash in host else disk_hits
                target[worker_id] = target.get(worker_id, 0) + 1  # type: ignore[index]
        return Overlaps(blocks, host_hits, disk_hits)


def _record(out: dict[str, int], worker_of: list[str | None], mask: int, value: int) -> None:
    while mask:
        low = mask & -mask
        out[worker_of[low.bit_length() - 1]] = value  # type: ignore[index]
        mask ^= low


def _clear(masks: dict[int, int], block_hash: int, keep: int) -> None:
    mask = masks.get(block_hash, 0) & keep
    if mask:
        masks[block_hash] = mask
    else:
        masks.pop(block_hash, None)
