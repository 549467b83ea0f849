"""A frontend and N mock-engine workers in one process, for agent-hint tests and benchmarks.

Everything on the request path is the real code: the HTTP app, the router,
the request plane (ZMQ, no CURVE), each worker's RequestServer + EngineLoop +
MockEngine on a live clock (modelled step times), its lower KV tiers and its
KV event publisher followed by the frontend's subscriber. Only the daemon is
absent (no heartbeats: load comes from the frontend's own in-flight counts).

    cluster = LocalCluster(recipe, num_workers=4); cluster.start()  # own event-loop thread
    ... HTTP against cluster.base_url ...
    cluster.stop()
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from dyn.config.recipe import Recipe
from dyn.engine.factory import create_engine


@dataclass
class LocalWorker:
    worker_id: str
    engine: Any
    loop: Any
    server: Any
    publisher: Any
    tiers: Any = None


class LocalCluster:
    def __init__(self, recipe: Recipe, num_workers: int = 2, *, host_tier_blocks: int = 0,
                 seed: int = 0, expiry_sweep_s: float = 1.0) -> None:
        self.recipe = recipe
        self.num_workers = num_workers
        self.host_tier_blocks = host_tier_blocks
        self.seed = seed
        self.expiry_sweep_s = expiry_sweep_s
        self.workers: dict[str, LocalWorker] = {}
        self._aio: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalCluster":
        import uvloop

        self._aio = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, daemon=True, name="local-cluster")
        self._thread.start()
        self.call(self._start)
        return self

    def stop(self) -> None:
        if self._aio is None:
            return
        try:
            self.call(self._stop)
        finally:
            self._aio.call_soon_threadsafe(self._aio.stop)
            self._thread.join(5)
            self._aio.close()
            self._aio = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> Any:
        """Run fn(*args) (coroutine function or plain) on the cluster's loop; return its result."""
        async def wrapper():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        future: Future = asyncio.run_coroutine_threadsafe(wrapper(), self._aio)
        return future.result(timeout_s)

    def on_engine(self, worker_id: str, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on a worker's engine thread (between steps)."""
        return self.workers[worker_id].loop.submit(fn).result(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        import zmq.asyncio

        from dyn.control.sockets import Security
        from dyn.frontend.app import build_app, start_site
        from dyn.frontend.kv_subscriber import KvEventSubscriber
        from dyn.frontend.process import build_frontend, worker_limits
        from dyn.frontend.workers import WorkerPool

        self.ctx = zmq.asyncio.Context()
        self.security = Security.from_keys(None)
        self._tasks: list[asyncio.Task] = []
        group = self.recipe.workers[0]
        for idx in range(self.num_workers):
            wid = f"worker-{idx}"
            self.workers[wid] = self._start_worker(wid, group)
        self.pool = WorkerPool(self.ctx, self.security, worker_limits(self.recipe))
        for wid, w in self.workers.items():
            self.pool.add(wid, group.role, w.server.address)
        self.frontend = build_frontend(self.recipe, self.pool, seed=self.seed)
        router = self.frontend.dispatcher.routing.router
        self.kv_events = KvEventSubscriber(self.ctx, self.security, router, self.pool.request_snapshot)
        self.pool.on_snapshot = self.kv_events.on_snapshot
        self._tasks.append(asyncio.create_task(self.kv_events.run()))
        for wid, w in self.workers.items():
            await self.kv_events.connect(wid, w.publisher.address)
        self.runner, self.port = await start_site(build_app(self.frontend), "127.0.0.1", 0)

    def _start_worker(self, wid: str, group) -> LocalWorker:
        from dyn.kv.host_tier import HostTier
        from dyn.worker.engine_loop import EngineLoop, sweep_expired
        from dyn.worker.kv_publisher import KvEventPublisher
        from dyn.worker.request_server import RequestServer

        engine = create_engine(self.recipe.model, group, device="cpu")
        server = RequestServer(self.ctx, "127.0.0.1", self.security, None, max_waiting=group.max_queue,
                               process_id=wid)
        publisher = KvEventPublisher(self.ctx, "127.0.0.1", self.security, wid)
        server.kv_snapshot = publisher.snapshot
        engine.set_kv_event_listener(publisher.listener)
        tiers = None
        if self.host_tier_blocks:
            tiers = HostTier(engine.block_bytes, self.host_tier_blocks * engine.block_bytes,
                             ttl_s=self.recipe.kv_tiers.ttl_s, listener=publisher.listener)
            engine.set_lower_tier(tiers)
        loop = EngineLoop(engine, server.on_outputs, name=f"engine-{wid}")
        server.attach(loop)
        loop.start()
        self._tasks += [asyncio.create_task(server.serve()), asyncio.create_task(publisher.run()),
                        asyncio.create_task(sweep_expired(loop, self.expiry_sweep_s))]
        return LocalWorker(wid, engine, loop, server, publisher, tiers)

    async def _stop(self) -> None:
        await self.frontend.dispatcher.agent.wait_idle(2.0)
        await self.runner.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=1.0)
        self.kv_events.close()
        self.pool.close()
        for w in self.workers.values():
            w.loop.stop()
            w.server.close()
            w.publisher.close()
        self.security.stop()
        self.ctx.term()
