"""Transfers between real processes: bit-exact delivery, and transfers killed halfway."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from dyn.shuttle import OfferDescriptor, ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender, TransferError
from dyn.shuttle.ring import SHM_DIR, sweep_stale_segments
from dyn.shuttle.transports import nixl

from shuttle_peer import make_blocks, read_offer

NEEDS_NIXL = pytest.mark.skipif(not nixl.is_available(), reason="nixl (pip install nixl-cu12) not installed")
BLOCK_BYTES = 1 << 16
NUM_BLOCKS = 48


def _views(array: np.ndarray, idx: list[int]) -> list[memoryview]:
    return [memoryview(array[i]) for i in idx]


@pytest.mark.parametrize("transport", ["shm", "tcp", pytest.param("nixl", marks=NEEDS_NIXL)])
def test_random_blocks_arrive_bit_exact_across_processes(spawn_peer, transport: str) -> None:
    sender = spawn_peer("sender", "--seed", "7", "--num-blocks", str(NUM_BLOCKS),
                        "--block-bytes", str(BLOCK_BYTES), "--transports", "shm", "tcp", transport)
    desc = OfferDescriptor.from_dict(read_offer(sender))
    hashes, expected = make_blocks(7, NUM_BLOCKS, BLOCK_BYTES)
    assert desc.block_hashes == hashes
    # The decode side already holds blocks 0..4 and 20: it asks for the rest only.
    missing = [i for i in range(NUM_BLOCKS) if i >= 5 and i != 20]
    dest = np.zeros((NUM_BLOCKS, BLOCK_BYTES), dtype=np.uint8)

    async def pull():
        async with ShuttleReceiver() as rx:
            return await rx.pull(desc, missing, _views(dest, missing), timeout_s=20, transport=transport,
                                 expected_hashes=hashes)

    stats = asyncio.run(pull())
    assert stats.transport == transport
    assert stats.num_blocks == len(missing) and stats.num_bytes == len(missing) * BLOCK_BYTES
    assert np.array_equal(dest[missing], expected[missing])
    assert not dest[[0, 1, 2, 3, 4, 20]].any(), "blocks not asked for must stay untouched"


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_sender_killed_halfway_fails_only_that_pull(spawn_peer, transport: str) -> None:
    dying = spawn_peer("sender", "--seed", "1", "--num-blocks", str(NUM_BLOCKS),
                       "--block-bytes", str(BLOCK_BYTES), "--die-after-chunks", "2")
    healthy = spawn_peer("sender", "--seed", "2", "--num-blocks", str(NUM_BLOCKS),
                         "--block-bytes", str(BLOCK_BYTES))
    dying_desc = OfferDescriptor.from_dict(read_offer(dying))
    healthy_desc = OfferDescriptor.from_dict(read_offer(healthy))
    idx = list(range(NUM_BLOCKS))
    broken = np.zeros((NUM_BLOCKS, BLOCK_BYTES), dtype=np.uint8)
    good = np.zeros((NUM_BLOCKS, BLOCK_BYTES), dtype=np.uint8)

    async def pulls():
        # "ring": the sender dies between chunks; a direct read has none (test_shuttle_cma covers it)
        config = ReceiverConfig(credit_bytes=1 << 18, stall_timeout_s=1.0, shm_mode="ring")
        async with ShuttleReceiver(config=config) as rx:
            return await asyncio.gather(
                rx.pull(dying_desc, idx, _views(broken, idx), timeout_s=20, transport=transport),
                rx.pull(healthy_desc, idx, _views(good, idx), timeout_s=20, transport=transport),
                return_exceptions=True)

    started = time.monotonic()
    failed, stats = asyncio.run(pulls())
    assert isinstance(failed, TransferError) and failed.reason == "timeout", failed
    assert failed.request_id == "req-1"
    assert time.monotonic() - started < 10
    assert dying.wait(timeout=5) == -signal.SIGKILL
    assert np.array_equal(good, make_blocks(2, NUM_BLOCKS, BLOCK_BYTES)[1]), "the other request is intact"
    assert stats.num_blocks == NUM_BLOCKS
    # Two chunks of 4 blocks landed before the sender died; the caller now cancels the import.
    assert 0 < int(broken.any(axis=1).sum()) < NUM_BLOCKS
    stale = [n for n in os.listdir(SHM_DIR) if n.startswith(f"dyn-shuttle-{dying.pid}-")]
    # A sender serving shm maps its fence table at its first offer (direct-read plans) and its ring
    # on its first ring send; a SIGKILLed one leaves them behind.
    assert len(stale) == (2 if transport == "shm" else 1), stale
    removed = sweep_stale_segments()
    assert set(stale) <= set(removed)
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"dyn-shuttle-{dying.pid}-")]


@pytest.mark.parametrize("transport", ["shm", "tcp", pytest.param("nixl", marks=NEEDS_NIXL)])
def test_receiver_killed_halfway_releases_the_offer_and_ring(spawn_peer, transport: str) -> None:
    hashes, blocks = make_blocks(3, NUM_BLOCKS, BLOCK_BYTES)
    released: list[tuple[str, bool]] = []

    async def run():
        config = SenderConfig(chunk_bytes=1 << 18, ring_bytes=1 << 20, stall_timeout_s=2.0,
                              transports=("shm", "tcp", "nixl") if transport == "nixl" else ("shm", "tcp"))
        async with ShuttleSender(BLOCK_BYTES, config=config,
                                 on_release=lambda rid, ok: released.append((rid, ok))) as tx:
            offer = tx.offer("doomed", hashes, [memoryview(b) for b in blocks])
            peer = spawn_peer("receiver", "--offer", _json(offer.descriptor), "--transport", transport,
                              "--chunk-bytes", str(1 << 18), "--die-after-chunks", "1")
            assert await asyncio.wait_for(offer.delivered, 15) is False
            returncode = await asyncio.to_thread(peer.wait, 5)
            assert returncode == -signal.SIGKILL, peer.stderr.read() if peer.stderr else returncode
            assert tx.num_pinned == 0
            if transport == "shm":
                ring = tx._transports["shm"].ring
                assert ring.num_free_slots == ring.num_slots, "the dead transfer's slots are back"
            # The sender keeps serving: a fresh offer goes through bit-exact.
            again = tx.offer("next", hashes, [memoryview(b) for b in blocks])
            dest = np.zeros_like(blocks)
            async with ShuttleReceiver() as rx:
                await rx.pull(again.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)),
                              timeout_s=10, transport=transport)
            assert np.array_equal(dest, blocks)
            assert await again.delivered is True
            return tx.stats

    stats = asyncio.run(run())
    assert released == [("doomed", False), ("next", True)]
    assert stats.failures == {"timeout": 1}


def _json(desc: OfferDescriptor) -> str:
    import json

    return json.dumps(desc.to_dict())
