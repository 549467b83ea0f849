"""Frontend replicas share their in-flight load per worker over PUB/SUB (best effort)."""

from __future__ import annotations

import asyncio

import zmq.asyncio

from dyn.control.keys import DeploymentKeys
from dyn.control.sockets import Security
from dyn.frontend.peers import PeerLoad
from dyn.frontend.routing import _load
from dyn.frontend.workers import WorkerHandle, WorkerLimits, WorkerPool


def _pool(ctx, security) -> WorkerPool:
    pool = WorkerPool(ctx, security)
    for wid in ("w0", "w1"):
        pool.workers[wid] = WorkerHandle(wid, "both", "n", "tcp://127.0.0.1:1", WorkerLimits(4, 8))
    return pool


async def _until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_replicas_see_each_others_load_and_forget_a_silent_peer():
    async def main():
        keys = DeploymentKeys.generate(["frontend", "frontend-1"])
        ctx, ctx_b = zmq.asyncio.Context(), zmq.asyncio.Context()  # one ZAP handler per context
        sec_a = Security.from_keys(keys.for_process("frontend"))
        sec_b = Security.from_keys(keys.for_process("frontend-1"))
        pool_a, pool_b = _pool(ctx, sec_a), _pool(ctx_b, sec_b)
        a = PeerLoad(ctx, sec_a, pool_a, "frontend", "127.0.0.1")
        b = PeerLoad(ctx_b, sec_b, pool_b, "frontend-1", "127.0.0.1", expire_s=0.5)
        peers = {"frontend": a.address, "frontend-1": b.address}
        a.update_peers(peers)
        b.update_peers(peers)
        tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
        try:
            # A opens 6 requests on w0 (this test sets the counters the pool keeps)
            handle = pool_a.workers["w0"]
            handle.in_flight, handle.in_flight_tokens = 6, 600
            pool_a.load_changed.set()
            seen = pool_b.workers["w0"]
            await _until(lambda: seen.peer_in_flight == 6)
            assert seen.peer_in_flight_tokens == 600 and pool_b.workers["w1"].peer_in_flight == 0
            assert pool_a.workers["w0"].peer_in_flight == 0  # a replica never counts itself
            # B's router now sees w0 busy: queue beyond the batch limit, KV blocks in use
            load = _load(seen, block_size=16)
            assert load.num_running == 4 and load.num_waiting == 2 and load.active_decode_blocks == 600 // 16
            # replicas that share a port publish their open connections on it (dyn.frontend.balance)
            a.set_connections("http://127.0.0.1:8000", 6)
            await _until(lambda: b.peer_connections("http://127.0.0.1:8000") == [6])
            assert b.peer_connections("http://127.0.0.1:9000") == []
            assert a.peer_connections("http://127.0.0.1:8000") == []  # a replica never counts itself
            # finishing requests is published as well
            handle.in_flight, handle.in_flight_tokens = 1, 100
            pool_a.load_changed.set()
            await _until(lambda: seen.peer_in_flight == 1)
            # a dead peer stops counting after expire_s (no bookkeeping needed)
            a.close()
            tasks[0].cancel()
            await asyncio.sleep(0.6)
            b.update_peers(peers)  # any later apply drops expired state
            assert seen.peer_in_flight == 0 and b.bad.total == 0 and b.num_received >= 2
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            b.close()
            sec_a.stop()
            sec_b.stop()
            ctx.term()
            ctx_b.term()

    asyncio.run(main())
