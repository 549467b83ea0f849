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
            view = ShmAttachments().region(ring.name, b * 4096, 4096)
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
        with pytest.raises(ValueError, match=r"region \[8000, 9000\) outside segment"):
            maps.region(ring.name, 8000, 1000)
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
