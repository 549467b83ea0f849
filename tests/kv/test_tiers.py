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
