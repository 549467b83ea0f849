"""Offer lifecycle, backpressure, bounded memory, refusals and bad input (one process)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from dyn.shuttle import ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender, TransferError
from dyn.shuttle.sender import fenced_shm_modes
from dyn.shuttle.wire import CODEC, Blocks, Credit, Pull

BLOCK_BYTES = 2048


def _data(num_blocks: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(range(100, 100 + num_blocks)), rng.integers(0, 256, (num_blocks, BLOCK_BYTES), dtype=np.uint8)


def test_sender_sends_no_more_than_the_credit_and_gives_up_on_a_silent_receiver() -> None:
    hashes, data = _data(16)
    released: list[tuple[str, bool]] = []

    async def run():
        config = SenderConfig(stall_timeout_s=1.5, ring_bytes=8 * BLOCK_BYTES, chunk_bytes=2 * BLOCK_BYTES)
        async with ShuttleSender(BLOCK_BYTES, config=config,
                                 on_release=lambda *a: released.append(a)) as tx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            ctx = zmq.asyncio.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(tx.address)
            try:
                await sock.send(CODEC.encode(Pull(offer_id=offer.descriptor.offer_id, transfer_id="t",
                                                  missing_idx=list(range(16)), transport="shm", shm_mode="ring",
                                                  credit_bytes=3 * BLOCK_BYTES, host_id=tx.host_id)))
                chunks = []
                while await sock.poll(300 if chunks else 5000):
                    chunks.append(CODEC.decode((await sock.recv_multipart())[0]))
                ring = tx._transports["shm"].ring
                held_while_stalled = ring.num_slots - ring.num_free_slots
                delivered = await asyncio.wait_for(offer.delivered, 5)
                return chunks, held_while_stalled, delivered, ring.num_free_slots == ring.num_slots
            finally:
                sock.close(linger=0)
                ctx.term()

    chunks, held, delivered, ring_free = asyncio.run(run())
    # Credit for 3 blocks, 2 blocks per chunk: exactly one chunk goes out, then the sender waits.
    assert [type(c) for c in chunks] == [Blocks] and chunks[0].block_idx == [0, 1]
    assert held == 1
    assert delivered is False and ring_free and released == [("r", False)]


@pytest.mark.parametrize("transport,shm_mode", [
    ("shm", "ring"), ("tcp", ""),
    pytest.param("shm", "direct", marks=pytest.mark.skipif("direct" not in fenced_shm_modes(),
                                                            reason="process_vm_readv not allowed here"))])
def test_many_blocks_through_a_tiny_ring_and_credit(transport: str, shm_mode: str) -> None:
    hashes, data = _data(200, seed=4)

    async def run():
        config = SenderConfig(ring_bytes=2 * 3 * BLOCK_BYTES, chunk_bytes=3 * BLOCK_BYTES)
        rx_config = ReceiverConfig(credit_bytes=5 * BLOCK_BYTES, shm_mode=shm_mode or "direct")
        async with ShuttleSender(BLOCK_BYTES, config=config) as tx, ShuttleReceiver(config=rx_config) as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            stats = await rx.pull(offer.descriptor, list(range(200)), list(map(memoryview, dest)), 10,
                                  transport=transport)
            delivered = await asyncio.wait_for(offer.delivered, 5)  # direct: Taken, no Done
            return stats, dest, tx._transports["shm"].ring.num_slots, delivered, tx.num_pinned

    stats, dest, num_slots, delivered, num_pinned = asyncio.run(run())
    assert np.array_equal(dest, data) and stats.num_bytes == 200 * BLOCK_BYTES
    assert num_slots == 2 and stats.shm_mode == shm_mode
    assert delivered is True and num_pinned == 0


def test_unpulled_offer_expires_and_is_then_refused() -> None:
    hashes, data = _data(4)
    released: list[tuple[str, bool]] = []

    async def run():
        async with ShuttleSender(BLOCK_BYTES, config=SenderConfig(pin_timeout_s=0.1),
                                 on_release=lambda *a: released.append(a)) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("late", hashes, list(map(memoryview, data)))
            assert await asyncio.wait_for(offer.delivered, 2) is False
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, [0], [memoryview(bytearray(BLOCK_BYTES))], 2)
            return info.value, tx.stats.num_expired

    err, num_expired = asyncio.run(run())
    assert released == [("late", False)] and num_expired == 1
    assert err.reason == "rejected" and "expired" in str(err) and "'late'" in str(err)


def test_refusals_name_the_problem() -> None:
    hashes, data = _data(4)

    async def run():
        async with ShuttleSender(BLOCK_BYTES, host_id="node-a") as tx, \
                ShuttleReceiver(host_id="node-b") as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            assert rx.pick_transport(offer.descriptor) == "tcp"
            dest = [memoryview(bytearray(BLOCK_BYTES))]
            errors = []
            for kwargs in ({"transport": "shm"}, {"transport": "nixl"}):
                with pytest.raises(TransferError) as info:
                    await rx.pull(offer.descriptor, [1], dest, 2, **kwargs)
                errors.append(info.value)
            # The refused pulls did not consume the offer: a tcp pull still works.
            await rx.pull(offer.descriptor, [1], dest, 2, transport="tcp")
            assert bytes(dest[0]) == data[1].tobytes()
            return errors

    shm_err, nixl_err = asyncio.run(run())
    assert shm_err.reason == "rejected" and "node-b" in str(shm_err) and "node-a" in str(shm_err)
    assert nixl_err.reason == "rejected" and "not offered" in str(nixl_err)


def test_bad_views_and_indices_are_refused_with_their_position() -> None:
    hashes, data = _data(4)

    async def run():
        async with ShuttleSender(BLOCK_BYTES, config=SenderConfig(max_offers=1)) as tx, \
                ShuttleReceiver() as rx:
            errors = {}
            for name, call in {
                "short_view": lambda: tx.offer("a", hashes, [memoryview(d) for d in data[:3]]
                                               + [memoryview(bytearray(10))]),
                "count": lambda: tx.offer("a", hashes[:3], list(map(memoryview, data))),
                "hash": lambda: tx.offer("a", [1, 2, -3, 4], list(map(memoryview, data))),
            }.items():
                with pytest.raises(TransferError) as info:
                    call()
                errors[name] = str(info.value)
            offer = tx.offer("a", hashes, list(map(memoryview, data)))
            with pytest.raises(TransferError) as info:
                tx.offer("b", hashes, list(map(memoryview, data)))
            errors["overloaded"] = info.value.reason
            good = memoryview(bytearray(BLOCK_BYTES))
            for name, (idx, views) in {"dest_size": ([0, 1], [good, memoryview(bytearray(7))]),
                                       "range": ([0, 9], [good, good]),
                                       "dup": ([1, 1], [good, good]),
                                       "lengths": ([0, 1], [good])}.items():
                with pytest.raises(TransferError) as info:
                    await rx.pull(offer.descriptor, idx, views, 2)
                errors[name] = str(info.value)
            return errors

    errors = asyncio.run(run())
    assert "block_views[3] holds 10 bytes, expected block_bytes=2048" in errors["short_view"]
    assert "3 block hashes but 4 block views" in errors["count"]
    assert "block_hashes[2]=-3" in errors["hash"]
    assert errors["overloaded"] == "overloaded"
    assert "dest_views[1] holds 7 bytes" in errors["dest_size"]
    assert "[9] out of range for 4" in errors["range"]
    assert "duplicates" in errors["dup"]
    assert "2 missing indices but 1 destination views" in errors["lengths"]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_torch_cpu_tensor_views_and_empty_pulls(transport: str) -> None:
    torch.manual_seed(0)
    pool = torch.randint(0, 256, (6, BLOCK_BYTES), dtype=torch.uint8)
    dest_pool = torch.zeros_like(pool)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("t", list(range(6)), [pool[i] for i in range(6)])
            await rx.pull(offer.descriptor, [1, 4, 5], [dest_pool[1], dest_pool[4], dest_pool[5]], 5,
                          transport=transport)
            nothing = tx.offer("cached", list(range(6)), [pool[i] for i in range(6)])
            stats = await rx.pull(nothing.descriptor, [], [], 5, transport=transport)
            return await offer.delivered, await nothing.delivered, stats

    delivered, delivered_empty, stats = asyncio.run(run())
    assert delivered and delivered_empty and stats.num_bytes == 0
    assert torch.equal(dest_pool[[1, 4, 5]], pool[[1, 4, 5]]) and not dest_pool[[0, 2, 3]].any()


async def _raw_then_pull(tx: ShuttleSender, rx: ShuttleReceiver,
                         *messages: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Send `messages` (each a list of frames) to the sender from a bare DEALER, then pull two
    offered blocks through it: (the blocks offered, what the receiver got)."""
    hashes, data = _data(2)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(tx.address)
    for frames in messages:
        await sock.send_multipart(frames)
    await asyncio.sleep(0.05)
    sock.close(linger=0)
    ctx.term()
    offer = tx.offer("r", hashes, list(map(memoryview, data)))
    dest = np.zeros_like(data)
    await rx.pull(offer.descriptor, [0, 1], list(map(memoryview, dest)), 5)
    return data, dest


def test_garbage_on_the_sender_socket_is_counted_not_fatal() -> None:
    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            data, dest = await _raw_then_pull(tx, rx, [b"\xc1 not msgpack"], [b"two", b"frames"])
            return tx._bad.total, data, dest

    num_bad, data, dest = asyncio.run(run())
    assert num_bad == 2 and np.array_equal(dest, data)


def test_a_message_whose_handling_raises_is_counted_and_the_sender_serves_on(monkeypatch) -> None:
    """A bug met by one message used to end the sender's loop: every later pull of this worker's
    offers went unanswered (decode recomputed them). Now it is counted and the loop serves on."""
    from dyn.shuttle.wire import Taken

    def broken(msg: Taken) -> None:
        raise KeyError("a bug")

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            monkeypatch.setattr(tx, "_on_taken", broken)
            data, dest = await _raw_then_pull(tx, rx, [CODEC.encode(Taken("nobody", True, 1))])
            return dict(tx._bad.counts), data, dest

    counts, data, dest = asyncio.run(run())
    assert counts == {"Taken: KeyError": 1} and np.array_equal(dest, data)


def test_a_sender_bug_costs_one_hand_off_not_the_sender(monkeypatch) -> None:
    from dyn.shuttle.transports.tcp import TcpSender

    hashes, data = _data(4)
    real_send = TcpSender.send

    async def broken(self, job):
        if job.request_id == "unlucky":
            raise RuntimeError("simulated bug")
        await real_send(self, job)

    monkeypatch.setattr(TcpSender, "send", broken)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            bad = tx.offer("unlucky", hashes, list(map(memoryview, data)))
            good = tx.offer("fine", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            with pytest.raises(TransferError) as info:
                await rx.pull(bad.descriptor, [0], [memoryview(dest[0])], 5, transport="tcp")
            await rx.pull(good.descriptor, [0, 1, 2, 3], list(map(memoryview, dest)), 5, transport="tcp")
            return info.value, dest, await bad.delivered, tx.stats.failures

    err, dest, delivered, failures = asyncio.run(run())
    assert err.reason == "rejected" and "internal error" in str(err)
    assert np.array_equal(dest, data) and delivered is False and failures == {"internal": 1}


def test_configs_from_the_recipe() -> None:
    from dyn.config.recipe import ShuttleSpec

    auto = SenderConfig.from_spec(ShuttleSpec(max_inflight_mib=128), address="tcp://127.0.0.1:0",
                                  cuda_available=False, nixl_available=True)
    assert auto.transports == ("shm", "tcp", "nixl") and auto.ring_bytes == 128 << 20
    forced = SenderConfig.from_spec(ShuttleSpec(transport="tcp"), address="tcp://127.0.0.1:0",
                                    cuda_available=True, nixl_available=True)
    assert forced.transports == ("tcp",)
    rx = ReceiverConfig.from_spec(ShuttleSpec(max_inflight_mib=512))
    assert rx.credit_bytes * rx.max_concurrent_pulls == 512 << 20


def test_withdrawn_offer_stops_its_transfer_and_the_receiver_hears_so() -> None:
    hashes, data = _data(64)
    released: list[tuple[str, bool]] = []

    async def run():
        async with ShuttleSender(BLOCK_BYTES, config=SenderConfig(chunk_bytes=BLOCK_BYTES),
                                 on_release=lambda *a: released.append(a)) as tx, \
                ShuttleReceiver(config=ReceiverConfig(credit_bytes=BLOCK_BYTES)) as rx:
            offer = tx.offer("cancelled", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            pull = asyncio.ensure_future(rx.pull(offer.descriptor, list(range(64)),
                                                 list(map(memoryview, dest)), 10, transport="tcp"))
            while not dest[1].any():  # one-block credit: the transfer is under way, block by block
                await asyncio.sleep(0.001)
            tx.withdraw(offer)
            with pytest.raises(TransferError) as info:
                await pull
            return info.value, tx.num_pinned

    err, num_pinned = asyncio.run(run())
    assert err.reason == "rejected" and "withdrawn" in str(err)
    assert released == [("cancelled", False)] and num_pinned == 0


def test_a_big_ring_sends_whole_bigger_slots_up_to_the_receivers_window() -> None:
    hashes, data = _data(64, seed=5)

    async def run(credit_blocks: int) -> tuple[list[int], int]:
        # A 64-block ring with 1-block chunks: slots grow to 64 / MIN_SLOTS (16) = 4 blocks.
        config = SenderConfig(ring_bytes=64 * BLOCK_BYTES, chunk_bytes=BLOCK_BYTES)
        async with ShuttleSender(BLOCK_BYTES, config=config) as tx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            ctx = zmq.asyncio.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(tx.address)
            try:
                await sock.send(CODEC.encode(Pull(offer_id=offer.descriptor.offer_id, transfer_id="t",
                                                  missing_idx=list(range(12)), transport="shm", shm_mode="ring",
                                                  credit_bytes=credit_blocks * BLOCK_BYTES, host_id=tx.host_id)))
                blocks_per_message: list[int] = []
                while sum(blocks_per_message) < 12 and await sock.poll(5000):
                    msg = CODEC.decode((await sock.recv_multipart())[0])
                    assert isinstance(msg, Blocks), msg
                    blocks_per_message.append(len(msg.block_idx))
                    await sock.send(CODEC.encode(Credit(transfer_id="t", slot=msg.slot,
                                                        num_bytes=len(msg.block_idx) * BLOCK_BYTES)))
                return blocks_per_message, tx._transports["shm"].slot_bytes
            finally:
                sock.close(linger=0)
                ctx.term()

    chunks, slot_bytes = asyncio.run(run(credit_blocks=8))
    assert slot_bytes == 4 * BLOCK_BYTES and chunks == [4, 4, 4]  # whole slots, not 1-block chunks
    chunks, _ = asyncio.run(run(credit_blocks=3))
    assert chunks == [3, 3, 3, 3]  # never more than the receiver's window in one message
