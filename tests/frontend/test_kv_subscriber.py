"""A real worker's KV events reach the router index; a late subscriber catches up by snapshot."""

import asyncio
import sys
from pathlib import Path

import zmq
import zmq.asyncio

from dyn.config.recipe import RouterSpec
from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest
from dyn.control.sampling import SamplingParams
from dyn.control.requests import REQUEST_CODEC, Finish, GenerateRequest, unbatched
from dyn.control.sockets import Security, client_socket, server_socket
from dyn.frontend.kv_subscriber import KvEventSubscriber
from dyn.kv.hashing import hash_blocks
from dyn.router.router import Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from test_worker_process import _ack_forever, _register, _start_worker, _stop, _until_ready  # noqa: E402


def test_events_and_snapshots_track_a_live_worker(tmp_path):
    async def scenario():
        ctx = zmq.asyncio.Context()
        daemon = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", Security())
        proc = _start_worker(tmp_path, daemon.getsockopt_string(zmq.LAST_ENDPOINT))
        try:
            _, reg = await _register(daemon)
            await _until_ready(daemon)
            acker = asyncio.create_task(_ack_forever(daemon))
            requests = client_socket(ctx, zmq.DEALER, reg.addresses["request"], Security())

            async def generate(rid: str, prompt: list[int]) -> None:
                await requests.send(REQUEST_CODEC.encode(GenerateRequest(rid, prompt, SamplingParams(max_tokens=2))))
                while True:
                    replies = unbatched(REQUEST_CODEC.decode(await asyncio.wait_for(requests.recv(), 20)))
                    if any(isinstance(r, Finish) or getattr(r, "finish", None) is not None for r in replies):
                        break

            # the worker caches a prompt before anyone subscribes
            early = list(range(3, 3 + 16 * 4 + 1))
            await generate("early", early)
            await asyncio.sleep(0.2)  # past the publisher's 10 ms flush: the snapshot mirror has it

            router = Router(RouterSpec(), block_size=16)
            snapshots: list[KvSnapshot] = []

            async def ask(worker_id: str) -> None:
                snap_sock = client_socket(ctx, zmq.DEALER, reg.addresses["request"], Security())
                await snap_sock.send(REQUEST_CODEC.encode(KvSnapshotRequest(worker_id)))
                reply = REQUEST_CODEC.decode(await asyncio.wait_for(snap_sock.recv(), 10))
                snap_sock.close()
                snapshots.append(reply)
                subscriber.on_snapshot(reply)

            subscriber = KvEventSubscriber(ctx, Security(), router, ask)
            runner = asyncio.create_task(subscriber.run())
            await subscriber.connect("worker-0", reg.addresses["kv_events"])
            assert snapshots and len(snapshots[0].blocks["device"]) >= 4
            assert router.find(hash_blocks(early, 16), now=0).blocks.get("worker-0") == 4

            # PUB/SUB drops what is sent before the SUB has joined: keep caching new prompts
            # until one shows up in the index (bounded), then the stream is live.
            for attempt in range(40):
                late = [7 + attempt] * (16 * 3 + 1)
                await generate(f"late{attempt}", late)
                await asyncio.sleep(0.1)
                if router.find(hash_blocks(late, 16), now=0).blocks.get("worker-0") == 3:
                    break
            assert router.find(hash_blocks(late, 16), now=0).blocks.get("worker-0") == 3
            assert subscriber.batches_applied >= 1 and subscriber.bad.total == 0

            subscriber.disconnect("worker-0")
            assert "worker-0" not in router.find(hash_blocks(early, 16), now=0).blocks
            runner.cancel()
            acker.cancel()
        finally:
            _stop(proc)
            ctx.destroy(linger=0)

    asyncio.run(scenario())
