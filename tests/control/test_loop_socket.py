"""LoopSocket (a DEALER as the frontend holds one per worker): NOBLOCK sends and drained
receives lose nothing and keep order, a send waits while the peer's queue is full and goes once
it drains, and closing ends a waiting receive."""

from __future__ import annotations

import asyncio
import contextlib

import zmq
import zmq.asyncio

from dyn.control.keys import DeploymentKeys
from dyn.control.loop_socket import LoopSocket
from dyn.control.sockets import Security, client_socket, server_socket


@contextlib.asynccontextmanager
async def _dealer_and_router(hwm: int = 10000):
    """A LoopSocket DEALER and an asyncio ROUTER, both with CURVE, as a frontend and a worker."""
    keys = DeploymentKeys.generate(["server", "client"])
    ctx = zmq.asyncio.Context()
    server_sec = Security.from_keys(keys.for_process("server"))
    router = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", server_sec, hwm=hwm)
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    dealer = LoopSocket(client_socket(zmq.Context.shadow(ctx.underlying), zmq.DEALER, address,
                                      Security.from_keys(keys.for_process("client")), hwm=hwm))
    try:
        yield dealer, router
    finally:
        dealer.close()
        router.close(linger=0)
        server_sec.stop()
        ctx.destroy(linger=0)


def test_echo_under_interleaved_sends_and_receives_with_curve() -> None:
    async def scenario() -> None:
        async with _dealer_and_router() as (dealer, router):
            async def echo() -> None:
                while True:
                    identity, payload = await router.recv_multipart()
                    await router.send_multipart([identity, payload, b"second frame"])

            server = asyncio.create_task(echo())
            n = 3000
            for burst in range(3):  # bursts (many queued per wake-up), then idle gaps (a real wait)
                for i in range(n // 3):
                    await dealer.send(f"{burst}-{i}".encode())
                got = []
                while len(got) < 2 * (n // 3):  # each reply is two frames, read one by one
                    got.append(bytes(await asyncio.wait_for(dealer.recv(), 10)))
                assert got[0::2] == [f"{burst}-{i}".encode() for i in range(n // 3)]  # all, in order
                assert set(got[1::2]) == {b"second frame"}
                assert dealer.try_recv() is None
                await asyncio.sleep(0.05)
            server.cancel()
            assert dealer.lost_signals == 0  # every wait was ended by the descriptor, none by the check

    asyncio.run(scenario())


def test_a_send_waits_while_the_peer_is_full_and_goes_when_it_drains() -> None:
    """Small queues and kernel buffers on both ends: once they are full nothing moves until the
    peer reads, so a send must wait; it goes, in order, when the peer drains."""
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        dealer_sock = zmq.Context.shadow(ctx.underlying).socket(zmq.DEALER)
        for sock in (router, dealer_sock):
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.setsockopt(zmq.RCVHWM, 4)
            sock.setsockopt(zmq.SNDBUF, 4096)
            sock.setsockopt(zmq.RCVBUF, 4096)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer_sock.connect(f"tcp://127.0.0.1:{port}")
        dealer = LoopSocket(dealer_sock)
        try:
            await dealer.send(b"hello")  # the connection is up once the router has a message
            await asyncio.wait_for(router.recv_multipart(), 10)
            body = bytes(64 << 10)
            sent = idle_rounds = 0
            while idle_rounds < 5:  # until nothing more goes for 5 rounds: every queue is full
                added = 0
                while dealer.send_now(sent.to_bytes(4, "big") + body):
                    sent, added = sent + 1, added + 1
                    assert sent < 1000, "the queues never filled"
                idle_rounds = 0 if added else idle_rounds + 1
                await asyncio.sleep(0.02)
            late = asyncio.create_task(dealer.send(b"late"))
            await asyncio.sleep(0.2)
            assert not late.done()  # waiting for room, not lost and not raised
            got = [bytes((await asyncio.wait_for(router.recv_multipart(), 10))[1])[:4] for _ in range(sent + 1)]
            await asyncio.wait_for(late, 10)
            assert got == [i.to_bytes(4, "big") for i in range(sent)] + [b"late"]
        finally:
            dealer.close()
            router.close(linger=0)
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_close_ends_a_waiting_receive() -> None:
    async def scenario() -> None:
        ctx = zmq.Context()
        sock = LoopSocket(client_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:9", Security()))
        waiting = asyncio.create_task(sock.recv())
        await asyncio.sleep(0.02)
        sock.close()
        try:
            await asyncio.wait_for(waiting, 2)
        except asyncio.CancelledError:
            pass
        assert waiting.done() and sock.sock.closed
        ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_whoever_reads_the_events_wakes_every_waiter_whose_event_is_there(monkeypatch) -> None:
    """Reading ZMQ_EVENTS clears the descriptor's signal: a receive's look at the events must not
    swallow the signal a waiting send needed (and the other way round), or that waiter sleeps
    until some later, unrelated signal. The events are faked to hold both at once."""
    import dyn.control.loop_socket as loop_socket

    fake = {"events": 0}
    monkeypatch.setattr(loop_socket, "_get_option", lambda sock, option: fake["events"])

    async def scenario() -> None:
        ctx = zmq.Context()
        sock = LoopSocket(ctx.socket(zmq.DEALER))  # connected to nothing: its descriptor never fires
        try:
            reading = asyncio.create_task(sock.wait(zmq.POLLIN))
            sending = asyncio.create_task(sock.wait(zmq.POLLOUT))
            await asyncio.sleep(0.05)
            assert not reading.done() and not sending.done()
            fake["events"] = zmq.POLLIN | zmq.POLLOUT  # (no descriptor signal comes with it)
            assert sock.try_recv() is None  # reads the events; the fake socket has nothing to give
            await asyncio.wait_for(asyncio.gather(reading, sending), 0.2)  # (before the periodic check)
            assert sock.lost_signals == 0

            # A signal nobody reads (lost): the waiter's own periodic look finds the event and counts it.
            fake["events"] = 0
            late = asyncio.create_task(sock.wait(zmq.POLLIN))
            await asyncio.sleep(0.05)
            fake["events"] = zmq.POLLIN
            await asyncio.wait_for(late, 2 * loop_socket.SIGNAL_CHECK_S)
            assert sock.lost_signals == 1
        finally:
            sock.close()
            ctx.destroy(linger=0)

    asyncio.run(scenario())
