import os

import numpy as np
import pytest

from dyn.kv.disk_tier import DiskTier
from dyn.kv.host_tier import HostTier

BLOCK = 256


def _block(seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8).tobytes())


def _dest() -> memoryview:
    return memoryview(bytearray(BLOCK))


def test_host_tier_round_trip_is_bit_exact():
    tier = HostTier(BLOCK, 4 * BLOCK)
    tier.offload(11, None, _block(1))
    dest = _dest()
    assert tier.fetch(11, dest)
    assert bytes(dest) == bytes(_block(1))
    assert not tier.fetch(12, _dest())


def test_host_tier_never_exceeds_capacity_and_evicts_lru_to_disk(tmp_path):
    events = []
    disk = DiskTier(tmp_path, BLOCK, 100 * (BLOCK + 16), listener=events.append)
    host = HostTier(BLOCK, 3 * BLOCK, below=disk, listener=events.append)
    for h in range(1, 6):
        host.offload(h, h - 1 if h > 1 else None, _block(h))
        assert host.used_bytes <= 3 * BLOCK
    # 1 and 2 were the least recently used: they moved down to disk
    assert [host.payload(h) is not None for h in range(1, 6)] == [False, False, True, True, True]
    assert disk.contains(1) and disk.contains(2)
    dest = _dest()
    assert host.fetch(1, dest) and bytes(dest) == bytes(_block(1))
    host_moves = [(e.kind, e.tier, e.block_hashes[0]) for e in events]
    assert ("stored", "disk", 1) in host_moves and ("removed", "host", 1) in host_moves


def test_host_tier_evicts_low_priority_first():
    tier = HostTier(BLOCK, 2 * BLOCK)
    tier.offload(1, None, _block(1), priority=5)
    tier.offload(2, None, _block(2), priority=0)
    tier.offload(3, None, _block(3), priority=0)
    assert tier.contains(1) and not tier.contains(2) and tier.contains(3)


def test_host_tier_ttl_expires_entries():
    now = [0.0]
    tier = HostTier(BLOCK, 2 * BLOCK, ttl_s=10, clock=lambda: now[0])
    tier.offload(1, None, _block(1))
    now[0] = 11
    assert not tier.contains(1)
    assert not tier.fetch(1, _dest())


def test_disk_tier_bounded_and_round_trip(tmp_path):
    disk = DiskTier(tmp_path, BLOCK, 3 * (BLOCK + 16))
    for h in range(10):
        disk.offload(h, None, _block(h))
        assert disk.used_bytes <= 3 * (BLOCK + 16)
        assert os.path.getsize(disk.path) == 3 * (BLOCK + 16)
    assert sorted(h for h in range(10) if disk.contains(h)) == [7, 8, 9]
    dest = _dest()
    assert disk.fetch(8, dest) and bytes(dest) == bytes(_block(8))
    disk.close()


def test_disk_tier_detects_corruption(tmp_path):
    disk = DiskTier(tmp_path, BLOCK, 4 * (BLOCK + 16))
    disk.offload(42, None, _block(42))
    with open(disk.path, "r+b") as f:  # flip one payload byte
        f.seek(16 + 7)
        byte = f.read(1)
        f.seek(16 + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not disk.fetch(42, _dest())
    assert disk.num_corrupt == 1 and not disk.contains(42)


@pytest.mark.parametrize("capacity", [0, BLOCK - 1])
def test_zero_capacity_tiers_hold_nothing(tmp_path, capacity):
    host = HostTier(BLOCK, capacity)
    host.offload(1, None, _block(1))
    assert not host.contains(1)


def _router_view(events):
    """What a router applying these events believes each tier holds."""
    held = {"host": set(), "disk": set(), "device": set()}
    for e in events:
        (held[e.tier].update if e.kind == "stored" else held[e.tier].difference_update)(e.block_hashes)
    return held


def test_reoffload_after_ttl_refreshes_the_entry_and_router_view_stays_true():
    """Regression: re-offloading an expired block used to touch the stale entry (still expired,
    never served), and expiry sent no removal event, so the router counted unservable host hits."""
    now = [0.0]
    events = []
    tier = HostTier(BLOCK, 4 * BLOCK, ttl_s=10, clock=lambda: now[0], listener=events.append)
    tier.offload(1, None, _block(1))
    now[0] = 11
    tier.offload(1, None, _block(1))  # evicted again from the GPU after the TTL passed
    assert tier.contains(1)
    dest = _dest()
    assert tier.fetch(1, dest) and bytes(dest) == bytes(_block(1))
    assert [(e.kind, e.block_hashes) for e in events] == [("stored", [1]), ("removed", [1]),
                                                          ("stored", [1])]
    now[0] = 22
    assert tier.expire() == 1  # the sweep drops it and says so
    assert _router_view(events)["host"] == set() and len(tier) == 0


def test_reoffload_of_live_entry_extends_its_ttl():
    now = [0.0]
    tier = HostTier(BLOCK, 4 * BLOCK, ttl_s=10, clock=lambda: now[0])
    tier.offload(1, None, _block(1))
    now[0] = 8
    tier.offload(1, None, _block(1))
    now[0] = 15
    assert tier.expire() == 0 and tier.contains(1)


def test_expiry_publishes_removal_in_host_and_disk(tmp_path):
    now = [0.0]
    events = []
    disk = DiskTier(tmp_path, BLOCK, 8 * (BLOCK + 16), ttl_s=5, clock=lambda: now[0], listener=events.append)
    host = HostTier(BLOCK, BLOCK, below=disk, ttl_s=5, clock=lambda: now[0], listener=events.append)
    host.offload(1, None, _block(1))
    host.offload(2, 1, _block(2))  # 1 moves down to disk
    assert _router_view(events) == {"host": {2}, "disk": {1}, "device": set()}
    now[0] = 6
    assert host.expire() == 2
    assert _router_view(events) == {"host": set(), "disk": set(), "device": set()}
    disk.close()


def test_retention_priority_and_ttl_order_eviction_in_host_and_disk(tmp_path):
    now = [0.0]
    for make in (lambda: HostTier(BLOCK, 2 * BLOCK, clock=lambda: now[0]),
                 lambda: DiskTier(tmp_path, BLOCK, 2 * (BLOCK + 16), clock=lambda: now[0])):
        tier = make()
        tier.offload(1, None, _block(1), priority=3, ttl_s=100)  # a retained system prompt
        tier.offload(2, None, _block(2))
        tier.offload(3, None, _block(3))  # pressure: 2 (priority 0) goes, 1 stays
        assert tier.contains(1) and not tier.contains(2) and tier.contains(3)
        tier.release([1])  # its session closed: back to priority 0, evictable like any block
        tier.offload(4, None, _block(4))
        tier.offload(5, None, _block(5))
        assert not tier.contains(1) and tier.contains(4) and tier.contains(5)
