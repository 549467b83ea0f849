"""The shm ring: bounded slots with backpressure, safe attachment, stale-segment sweep."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from dyn.shuttle.ring import SHM_DIR, ShmAttachments, ShmRing, sweep_stale_segments


def test_slots_are_bounded_and_waiters_get_freed_slots() -> None:
    async def run():
        ring = ShmRing(4096, 2)
        try:
            a = await ring.allocate(1)
            b = await ring.allocate(1)
            with pytest.raises(TimeoutError):
                await ring.allocate(0.05)
            waiter = asyncio.ensure_future(ring.allocate(1))
            await asyncio.sleep(0)
            ring.free(a)
            got = await waiter
            ring.slot_array(b)[:] = 7
            view = ShmAttachments().region(ring.name, ring.slot_offset(b), 4096)
            return {a, b}, got, a, bytes(view[:3]), ring.path
        finally:
            ring.close()

    slots, got, freed, head, path = asyncio.run(run())
    assert slots == {0, 1} and got == freed and head == b"\x07\x07\x07"
    assert not os.path.exists(path), "close() unlinks the segment"


def test_attachments_refuse_foreign_names_and_out_of_range_regions() -> None:
    ring = ShmRing(4096, 2)
    maps = ShmAttachments()
    try:
        with pytest.raises(ValueError, match="not a dyn shuttle ring"):
            maps.region("../etc/passwd", 0, 1)
        end = ring.slot_offset(2)
        with pytest.raises(ValueError, match=rf"region \[{end - 10}, {end + 990}\) outside segment"):
            maps.region(ring.name, end - 10, 1000)
    finally:
        ring.close()


def test_a_fenced_slot_is_read_live_and_only_at_a_slot_start() -> None:
    """The receiver sees the sender's generation change without remapping, and a chunk that names
    an offset other than its slot's start (or more bytes than a slot) is refused."""
    ring = ShmRing(4096, 3)
    maps = ShmAttachments()
    try:
        ring.begin_write(1)
        ring.slot_array(1)[:] = 5
        generation = ring.end_write(1)
        region, gens = maps.fenced_slot(ring.name, 1, ring.slot_offset(1), 4096)
        assert generation == 2 and int(gens[1]) == 2 and region[0] == 5
        ring.begin_write(1)
        assert int(gens[1]) == 3  # odd: mid-write
        for slot, offset, size in ((1, ring.slot_offset(1) + 8, 8), (3, ring.slot_offset(2) + 4096, 8),
                                   (1, ring.slot_offset(1), 4097)):
            with pytest.raises(ValueError, match="is not a slot of"):
                maps.fenced_slot(ring.name, slot, offset, size)
    finally:
        ring.close()


def test_sweep_removes_only_rings_of_dead_processes() -> None:
    live = ShmRing(4096, 2)
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead = os.path.join(SHM_DIR, f"dyn-shuttle-{dead_pid}-0123456789ab")
    open(dead, "wb").close()
    try:
        removed = sweep_stale_segments()
        assert os.path.basename(dead) in removed and not os.path.exists(dead)
        assert os.path.exists(live.path)
    finally:
        live.close()
        if os.path.exists(dead):
            os.unlink(dead)
