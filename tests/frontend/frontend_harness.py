"""A frontend and fake workers on one uvloop thread, for tests that drive it over HTTP.

Everything is real except the workers' model: the HTTP server, the request
plane sockets with CURVE keys, the router. Tests call the server from the
main thread with the openai client or plain HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, Callable

import uvloop
import zmq.asyncio

from dyn.config.recipe import MockTiming, ModelSpec, Recipe, RouterSpec, WorkerGroup
from dyn.control.keys import DeploymentKeys
from dyn.control.sockets import Security
from dyn.frontend.app import build_app, start_site
from dyn.frontend.process import build_frontend, worker_limits
from dyn.frontend.workers import WorkerPool
from frontend_fakes import FakeWorker

MODEL = "tiny-mock"


def make_recipe(mode: str = "aggregated", *, max_context: int = 512, max_queue: int = 256,
                max_batch_size: int = 64, threshold: int = 16, policy: str = "kv") -> Recipe:
    groups = ((WorkerGroup("prefill", max_queue=max_queue, max_batch_size=max_batch_size),
               WorkerGroup("decode", max_queue=max_queue, max_batch_size=max_batch_size))
              if mode == "disaggregated" else
              (WorkerGroup("both", max_queue=max_queue, max_batch_size=max_batch_size),))
    return Recipe(name="t", model=ModelSpec(path=f"/nonexistent/{MODEL}", engine="mock",
                                            max_context=max_context, block_size=4, mock=MockTiming()),
                  mode=mode, workers=groups,  # type: ignore[arg-type]
                  router=RouterSpec(policy=policy, disagg_threshold_tokens=threshold))


class Harness:
    def __init__(self, recipe: Recipe, workers: list[tuple[str, str]], *, curve: bool = True,
                 stall_timeout_s: float = 30.0, **worker_kwargs: Any) -> None:
        """`workers`: (id, role) pairs; worker_kwargs go to every FakeWorker."""
        self.recipe = recipe
        self._spec = workers
        self._curve = curve
        self._stall_timeout_s = stall_timeout_s
        self._worker_kwargs = worker_kwargs
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.workers: dict[str, FakeWorker] = {}

    def __enter__(self) -> "Harness":
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 30.0) -> Any:
        """Run fn(*args) (a coroutine function or a plain one) on the server loop."""
        async def wrapper():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        future: Future = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        return future.result(timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        ids = ["frontend"] + [wid for wid, _ in self._spec]
        keys = DeploymentKeys.generate(ids) if self._curve else None
        self.securities = []
        kv_store: dict = {}
        for wid, _role in self._spec:
            sec = Security.from_keys(keys.for_process(wid) if keys else None)
            self.securities.append(sec)
            # One context per worker, as in separate processes (one ZAP handler each).
            self.workers[wid] = FakeWorker(wid, sec, zmq.asyncio.Context(), kv_store=kv_store,
                                           **self._worker_kwargs)
        sec = Security.from_keys(keys.for_process("frontend") if keys else None)
        self.securities.append(sec)
        self.pool = WorkerPool(self.ctx, sec, worker_limits(self.recipe))
        for wid, role in self._spec:
            self.pool.add(wid, role, self.workers[wid].address)
        self.frontend = build_frontend(self.recipe, self.pool, seed=0, stall_timeout_s=self._stall_timeout_s)
        self.runner, self.port = await start_site(build_app(self.frontend), "127.0.0.1", 0)

    async def _stop(self) -> None:
        await self.runner.cleanup()
        self.pool.close()
        for worker in self.workers.values():
            await worker.close()
        for sec in self.securities:
            sec.stop()
        for worker in self.workers.values():
            worker.ctx.term()
        self.ctx.term()
