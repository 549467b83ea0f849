"""Integrity: a wrong hash, a corrupted payload or a rewritten shm slot fails that one hand-off, cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from dyn.shuttle import ReceiverConfig, ShuttleReceiver, ShuttleSender, TransferError
from dyn.shuttle.ring import FENCE_SOUND
from dyn.shuttle.sender import fenced_shm_modes
from dyn.shuttle.wire import Blocks

fence_only = pytest.mark.skipif(not FENCE_SOUND, reason="the shm slot fence is served on x86-64 only")
direct_only = pytest.mark.skipif("direct" not in fenced_shm_modes(),
                                 reason="this host does not allow process_vm_readv (Yama, or not x86-64)")

BLOCK_BYTES = 4096
NUM_BLOCKS = 24


def _blocks(seed: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return ([int(h) for h in rng.integers(0, 2**63, NUM_BLOCKS, dtype=np.int64)],
            rng.integers(0, 256, (NUM_BLOCKS, BLOCK_BYTES), dtype=np.uint8))


def _tamper(tx: ShuttleSender, victim: str, edit: Callable[[ShuttleSender, list[object]], None]) -> None:
    """Run `edit` on the third chunk sent for request `victim`, as it leaves the sender."""
    real_send = tx._send
    seen = 0

    async def send(identity: bytes, parts: list[object]) -> None:
        nonlocal seen
        msg = parts[0]
        if isinstance(msg, Blocks) and tx._jobs[msg.transfer_id].offer.request_id == victim:
            seen += 1
            if seen == 3:
                edit(tx, parts)
        await real_send(identity, parts)

    tx._send = send  # type: ignore[method-assign]


def _wrong_hash(tx: ShuttleSender, parts: list[object]) -> None:
    parts[0].block_hashes[0] ^= 1  # type: ignore[attr-defined]


def _flip_payload(tx: ShuttleSender, parts: list[object]) -> None:
    msg = parts[0]
    assert isinstance(msg, Blocks)
    if msg.slot >= 0:
        tx._transports["shm"].ring.slot_array(msg.slot)[BLOCK_BYTES + 17] ^= 0x40  # type: ignore[attr-defined]
    else:
        bad = np.array(parts[2], copy=True)
        bad[17] ^= 0x40
        parts[2] = bad


def _sender_dies_mid_write(tx: ShuttleSender, parts: list[object]) -> None:
    """The slot is taken for another write that never ends, as a sender killed mid-copy leaves it."""
    tx._transports["shm"].ring.begin_write(parts[0].slot)  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport,shm_mode,edit,reason,bad_block", [
    ("tcp", "direct", _wrong_hash, "hash_mismatch", 8),
    ("tcp", "direct", _flip_payload, "checksum_mismatch", 9),
    ("shm", "ring", _wrong_hash, "hash_mismatch", 8),
    ("shm", "ring+xxh3_64", _flip_payload, "checksum_mismatch", 9),
    pytest.param("shm", "ring", _sender_dies_mid_write, "slot_reused", 8, marks=fence_only),
])
def test_corruption_fails_only_the_victim(transport: str, shm_mode: str, edit, reason: str,
                                          bad_block: int) -> None:
    victim_hashes, victim_data = _blocks(1)
    other_hashes, other_data = _blocks(2)
    released: dict[str, bool] = {}

    async def run():
        # credit of 4 blocks -> 4 blocks per chunk: the third victim chunk carries blocks 8..11.
        rx_config = ReceiverConfig(credit_bytes=4 * BLOCK_BYTES, shm_mode=shm_mode)
        async with ShuttleSender(BLOCK_BYTES, on_release=released.__setitem__) as tx, \
                ShuttleReceiver(config=rx_config) as rx:
            _tamper(tx, "victim", edit)
            victim = tx.offer("victim", victim_hashes, list(map(memoryview, victim_data)))
            other = tx.offer("other", other_hashes, list(map(memoryview, other_data)))
            idx = list(range(NUM_BLOCKS))
            dest_v = np.zeros_like(victim_data)
            dest_o = np.zeros_like(other_data)
            results = await asyncio.gather(
                rx.pull(victim.descriptor, idx, list(map(memoryview, dest_v)), 10, transport=transport),
                rx.pull(other.descriptor, idx, list(map(memoryview, dest_o)), 10, transport=transport),
                return_exceptions=True)
            delivered = await asyncio.gather(victim.delivered, other.delivered)
            return results, delivered, dest_o, tx.num_pinned

    (err, stats), delivered, dest_o, num_pinned = asyncio.run(run())
    assert isinstance(err, TransferError), err
    assert err.reason == reason and err.block_idx == bad_block and err.request_id == "victim"
    assert stats.num_blocks == NUM_BLOCKS and np.array_equal(dest_o, other_data)
    assert delivered == [False, True]
    assert released == {"victim": False, "other": True} and num_pinned == 0


@fence_only
def test_a_shm_slot_rewritten_while_the_receiver_copies_it_fails_that_pull(monkeypatch) -> None:
    """The sender gave up on a transfer and reused its slot while the receiver was still copying
    out of it: the slot's generation changed across the copy, so the pull fails, and the sender's
    next transfer through the same slot goes through."""
    from dyn.shuttle.transports import shm

    hashes, data = _blocks(6)
    real_write = shm.write_block
    rewrites: list[int] = []

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, \
                ShuttleReceiver(config=ReceiverConfig(credit_bytes=4 * BLOCK_BYTES, shm_mode="ring")) as rx:
            ring = tx._transports["shm"].ring  # type: ignore[attr-defined]

            sent_slots: list[int] = []
            real_send = tx._send

            async def send(identity: bytes, parts: list[object]) -> None:
                if isinstance(parts[0], Blocks):
                    sent_slots.append(parts[0].slot)
                await real_send(identity, parts)
            tx._send = send  # type: ignore[method-assign]

            def write_block(view, payload):  # the receiver's copy of one block
                real_write(view, payload)
                if not rewrites:  # another transfer's bytes land in the slot mid-copy
                    ring.begin_write(sent_slots[0])
                    ring.slot_array(sent_slots[0])[:] = 0xEE
                    rewrites.append(ring.end_write(sent_slots[0]))

            monkeypatch.setattr(shm, "write_block", write_block)
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                              transport="shm")
            again = tx.offer("r2", hashes, list(map(memoryview, data)))
            stats = await rx.pull(again.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                                  transport="shm")
            return info.value, await offer.delivered, stats, dest

    err, delivered, stats, dest = asyncio.run(run())
    assert err.reason == "slot_reused" and "rewritten during the copy" in str(err) and err.block_idx == 0
    assert delivered is False and len(rewrites) == 1
    assert stats.num_blocks == NUM_BLOCKS and np.array_equal(dest, data)


def test_offer_whose_hashes_differ_from_the_prompt_is_refused_before_any_copy() -> None:
    hashes, data = _blocks(3)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            mine = list(hashes)
            mine[5] += 1
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, [0, 5], [memoryview(dest[0]), memoryview(dest[5])], 5,
                              expected_hashes=mine)
            return info.value, dest

    err, dest = asyncio.run(run())
    assert err.reason == "hash_mismatch" and err.block_idx == 5
    assert not dest.any()


@direct_only
@pytest.mark.parametrize("planned", [True, False], ids=["offer_plan", "pull"])
def test_a_direct_read_that_overlaps_the_senders_release_fails_that_pull(monkeypatch, planned: bool) -> None:
    """The sender released the offer (unpinning the blocks, which its engine may then reuse) while
    the receiver was still reading them: the fence moved across the read. Both ways of a direct
    read: from the offer's plan (no round trip) and after a Pull (when no plan was made)."""
    from dyn.shuttle.transports import shm

    hashes, data = _blocks(8)
    real_read = shm.cma.read_into
    if not planned:
        monkeypatch.setattr(shm.ShmSender, "plan_direct", lambda self, views, block_bytes: (-1, []))

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, \
                ShuttleReceiver(config=ReceiverConfig(credit_bytes=4 * BLOCK_BYTES)) as rx:
            fences = tx._transports["shm"].fences  # type: ignore[attr-defined]

            def read_into(pid, dests, sources):
                real_read(pid, dests, sources)
                if len(dests) > 1:  # not the one-token identity read: what release does before unpinning
                    slots = [o.fence_slot for o in tx._offers.values()] + \
                        [r.job.fence_slot for r in tx._jobs.values()]
                    for slot in (s for s in slots if s >= 0):
                        fences.begin_write(slot)
                        fences.end_write(slot)

            monkeypatch.setattr(shm.cma, "read_into", read_into)
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                              transport="shm")
            return info.value, await offer.delivered, bool(offer.descriptor.direct)

    err, delivered, has_plan = asyncio.run(run())
    assert err.reason == "slot_reused" and "fence" in str(err) and err.block_idx == 0
    assert delivered is False and has_plan is planned


@direct_only
def test_a_direct_reader_refuses_a_pid_that_is_not_the_sender(monkeypatch) -> None:
    """The first chunk names a token in the sender's memory; a pid that does not hold it (reused,
    or from another pid namespace) is never read from."""
    from dyn.shuttle.transports.shm import ShmSender

    hashes, data = _blocks(9)
    real_identity = ShmSender._identity
    monkeypatch.setattr(ShmSender, "_identity", lambda self: real_identity(self)[:8] + bytes(16))

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                              transport="shm")
            return info.value, dest

    err, dest = asyncio.run(run())
    assert err.reason == "cma" and "is not the sender" in str(err) and not dest.any()


@direct_only
def test_a_receiver_the_kernel_refuses_direct_reads_goes_through_the_ring(monkeypatch) -> None:
    """process_vm_readv refused (another user, a stricter ptrace rule): that pull fails (and is
    prefilled locally), and every later one goes through the ring instead of failing the same way."""
    import errno

    from dyn.shuttle import cma
    from dyn.shuttle.transports import shm

    hashes, data = _blocks(10)

    def refused(pid, dests, sources):
        raise cma.CmaError(errno.EPERM, "process_vm_readv: Operation not permitted")

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            rx._can_read_direct = True  # probed before the kernel started refusing
            monkeypatch.setattr(shm.cma, "read_into", refused)
            results = []
            for rid in ("first", "second"):
                offer = tx.offer(rid, hashes, list(map(memoryview, data)))
                dest = np.zeros_like(data)
                try:
                    stats = await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                                          transport="shm")
                    results.append((stats.shm_mode, np.array_equal(dest, data)))
                except TransferError as exc:
                    results.append((exc.reason, False))
            return results

    assert asyncio.run(run()) == [("cma", False), ("ring", True)]


def test_integrity_is_agreed_explicitly_and_a_version_mismatch_fails_clearly() -> None:
    """An offer from a sender that predates shm modes is refused up front (no silent guess); a
    Pull asking for a mode the sender does not serve is rejected by name."""
    from dyn.shuttle import OfferDescriptor

    hashes, data = _blocks(7)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            old = offer.descriptor.to_dict()
            del old["shm_modes"]
            dest = [memoryview(bytearray(BLOCK_BYTES))]
            errors = []
            with pytest.raises(TransferError) as info:
                await rx.pull(OfferDescriptor.from_dict(old), [0], dest, 5)
            errors.append(info.value)
            rx._shm_mode = lambda offer, views: "bogus"  # type: ignore[method-assign]
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, [0], dest, 5, transport="shm")
            errors.append(info.value)
            return errors, offer.descriptor.shm_modes

    (old_sender, bad_mode), served = asyncio.run(run())
    assert old_sender.reason == "rejected" and "older dyn" in str(old_sender)
    assert bad_mode.reason == "rejected" and "shm mode 'bogus' is not served on shm" in str(bad_mode)
    assert served == [*fenced_shm_modes(), "ring+xxh3_64"] and served[-1] == "ring+xxh3_64"


@pytest.mark.skipif(not FENCE_SOUND, reason="shm offers direct reads only on x86-64")
def test_a_host_that_forbids_direct_reads_is_named_and_its_offers_go_through_the_ring(
        monkeypatch, tmp_path, caplog) -> None:
    """Yama's ptrace_scope 1 (Ubuntu's default) forbids sibling processes' reads: the sender says
    why at start (an operator sees why hand-offs run at half speed) and offers no direct mode."""
    from dyn.shuttle import cma

    yama = tmp_path / "ptrace_scope"
    yama.write_text("1\n")
    monkeypatch.setattr(cma, "_YAMA", str(yama))
    hashes, data = _blocks(3)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx:
            return tx.offer("r", hashes, list(map(memoryview, data))).descriptor.shm_modes

    with caplog.at_level("INFO", logger="dyn.shuttle.sender"):
        assert asyncio.run(run()) == ["ring", "ring+xxh3_64"]
    assert "kernel.yama.ptrace_scope is 1, not 0" in caplog.text


def test_a_stream_that_ends_early_is_partial_not_success(monkeypatch) -> None:
    from dyn.shuttle.transports.tcp import TcpSender

    hashes, data = _blocks(4)
    real_chunks = TcpSender.send

    async def short(self, job):
        job.block_idx = job.block_idx[:-1]  # "forgets" the last block, then reports End honestly
        await real_chunks(self, job)

    monkeypatch.setattr(TcpSender, "send", short)

    async def run():
        async with ShuttleSender(BLOCK_BYTES) as tx, ShuttleReceiver() as rx:
            offer = tx.offer("r", hashes, list(map(memoryview, data)))
            dest = np.zeros_like(data)
            with pytest.raises(TransferError) as info:
                await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                              transport="tcp")
            return info.value, await offer.delivered

    err, delivered = asyncio.run(run())
    assert err.reason == "partial" and f"of {NUM_BLOCKS} blocks" in str(err) and delivered is False


def test_an_unreachable_sender_times_out_quickly() -> None:
    from dyn.shuttle import OfferDescriptor

    desc = OfferDescriptor(request_id="r", offer_id="x", block_hashes=[1], block_bytes=BLOCK_BYTES,
                           address="tcp://127.0.0.1:9", host_id="elsewhere", transports=["tcp"],
                           shm_modes=["ring+xxh3_64"])

    async def run():
        async with ShuttleReceiver(config=ReceiverConfig(stall_timeout_s=0.2)) as rx:
            with pytest.raises(TransferError) as info:
                await rx.pull(desc, [0], [memoryview(bytearray(BLOCK_BYTES))], 5)
            return info.value

    err = asyncio.run(run())
    assert err.reason == "timeout" and "silent for 0.2s" in str(err) and err.peer == "tcp://127.0.0.1:9"


def test_a_clean_pulls_socket_is_kept_and_a_failed_ones_is_not() -> None:
    from dyn.shuttle.wire import Reject

    hashes, data = _blocks(5)
    seen: list[tuple[bytes, str]] = []  # (receiver socket identity, transfer id) of each Blocks message

    async def run():
        # credit of 4 blocks -> 4 blocks per chunk: _tamper's third chunk exists
        async with ShuttleSender(BLOCK_BYTES) as tx, \
                ShuttleReceiver(config=ReceiverConfig(credit_bytes=4 * BLOCK_BYTES)) as rx:
            real_send = tx._send

            async def send(identity: bytes, parts: list[object]) -> None:
                if isinstance(parts[0], Blocks):
                    seen.append((identity, parts[0].transfer_id))
                await real_send(identity, parts)
            tx._send = send  # type: ignore[method-assign]

            async def pull(request_id: str) -> np.ndarray:
                offer = tx.offer(request_id, hashes, list(map(memoryview, data)))
                dest = np.zeros_like(data)
                await rx.pull(offer.descriptor, list(range(NUM_BLOCKS)), list(map(memoryview, dest)), 5,
                              transport="tcp")
                return dest

            assert (await pull("a") == data).all()
            first_socket, first_transfer = seen[-1]
            # A late word about the finished transfer, on the kept socket: the next pull skips it.
            tx._send_nowait(first_socket, Reject(transfer_id=first_transfer, reason="late"))
            assert (await pull("b") == data).all()
            second_socket = seen[-1][0]
            _tamper(tx, "c", _flip_payload)
            with pytest.raises(TransferError):
                await pull("c")
            failed_socket = seen[-1][0]
            assert (await pull("d") == data).all()
            return first_socket, second_socket, failed_socket, seen[-1][0]

    first, second, failed, after = asyncio.run(run())
    assert first == second == failed  # one connection for the clean pulls (and the one that then failed)
    assert after != failed  # the socket of a failed transfer is closed, never reused
