"""LoopRouter: NOBLOCK sends and drained receives on the event loop lose no message and never
stall, including when a send takes the descriptor's signal for a message already queued."""

from __future__ import annotations

import asyncio
import contextlib

import zmq
import zmq.asyncio

from dyn.control.keys import DeploymentKeys
from dyn.control.loop_router import LoopRouter
from dyn.control.requests import REQUEST_CODEC, Cancel, Finish
from dyn.control.sockets import BadMessages, Security, client_socket


@contextlib.asynccontextmanager
async def _router_and_client():
    """A LoopRouter and a DEALER connected to it, both with CURVE, as a worker and a frontend."""
    keys = DeploymentKeys.generate(["server", "client"])
    ctx = zmq.asyncio.Context()
    server_sec = Security.from_keys(keys.for_process("server"))
    router = LoopRouter(ctx, "tcp://127.0.0.1:*", server_sec)
    client = client_socket(ctx, zmq.DEALER, router.address, Security.from_keys(keys.for_process("client")))
    try:
        yield router, client
    finally:
        client.close(linger=0)
        router.close(linger_ms=0)
        server_sec.stop()
        ctx.destroy(linger=0)


def test_echo_under_interleaved_sends_and_receives_with_curve() -> None:
    async def scenario() -> None:
        async with _router_and_client() as (router, client):
            bad = BadMessages("test")

            async def serve() -> None:
                while True:
                    routed = await router.receive(REQUEST_CODEC, bad)
                    if routed is not None:  # answer each cancel with a finish (a send per receive)
                        rid = routed.message.request_id
                        router.send(routed.identity, REQUEST_CODEC.encode(Finish(rid, "abort")))

            server = asyncio.create_task(serve())
            n = 3000
            for burst in range(3):  # bursts (many queued per wake-up), then idle gaps (a real wait)
                for i in range(n // 3):
                    await client.send(REQUEST_CODEC.encode(Cancel(f"r{burst}-{i}")))
                got = []
                while len(got) < n // 3:
                    got.append(REQUEST_CODEC.decode(await asyncio.wait_for(client.recv(), 10)).request_id)
                assert got == [f"r{burst}-{i}" for i in range(n // 3)]  # all, in order
                await asyncio.sleep(0.05)

            await client.send_multipart([b"one", b"two"])  # wrong frame count: counted, not fatal
            await client.send(b"\xc1garbage")
            await client.send(REQUEST_CODEC.encode(Cancel("after")))
            assert REQUEST_CODEC.decode(await asyncio.wait_for(client.recv(), 10)).request_id == "after"
            assert bad.total == 2 and router.sends_dropped == 0
            server.cancel()

    asyncio.run(scenario())


def test_close_ends_a_waiting_receive() -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        router = LoopRouter(ctx, "tcp://127.0.0.1:*", Security())
        waiting = asyncio.create_task(router.receive(REQUEST_CODEC, BadMessages("test")))
        await asyncio.sleep(0.02)
        router.close(linger_ms=0)
        try:
            await asyncio.wait_for(waiting, 2)
        except asyncio.CancelledError:
            pass
        assert waiting.done()
        ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_several_replies_go_as_one_multipart_message_that_a_dealer_reads_as_messages_in_order() -> None:
    """The worker sends a step's replies to one frontend in one send; the frontend's DEALER reads
    each frame as a message of its own (recv by recv), in the order they were sent."""
    async def scenario() -> None:
        async with _router_and_client() as (router, client):
            bad = BadMessages("test")
            await client.send(REQUEST_CODEC.encode(Cancel("hello")))
            routed = await asyncio.wait_for(router.receive(REQUEST_CODEC, bad), 10)
            router.send(routed.identity, *(REQUEST_CODEC.encode(Finish(f"r{i}", "stop")) for i in range(5)))
            router.send(routed.identity, REQUEST_CODEC.encode(Finish("single", "stop")))
            got, more = [], []
            for _ in range(6):
                got.append(REQUEST_CODEC.decode(await asyncio.wait_for(client.recv(), 10)).request_id)
                more.append(bool(client.getsockopt(zmq.RCVMORE)))
            assert got == ["r0", "r1", "r2", "r3", "r4", "single"]
            assert more == [True, True, True, True, False, False]  # one message of five frames, then one
            assert router.sends_dropped == 0

    asyncio.run(scenario())
