"""The engine's synchronous step loop on its own thread, fed through a queue.

Every call into the engine (add, abort, stats, export, import) runs on this
thread between two steps, so the engine needs no locks and the asyncio side
never blocks. When the engine has nothing to do the thread sleeps on the
queue; a cancel therefore takes effect before the next step.

An engine can have work and still nothing to compute: a vLLM decode worker
whose requests all wait for their prompt KV from a prefill worker. Stepping
it is what polls the transfer, but back to back it runs 200-2,700 empty
steps/s (measured on CPU), each one a round trip to vLLM's executor. So
while `is_waiting_on_transfers()` says so, the loop waits on its queue
between steps: a quarter of the time waited so far, 1 ms to 10 ms. A
transfer is thus noticed at most 25% (and 10 ms) late; new work or an abort
still wakes the loop at once. On an oversubscribed CPU a woken thread may
first wait for a core: scripts/bench_vllm_kv_wait.py has what that cost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from dyn.engine.backend import Backend, TokenOutput

log = logging.getLogger(__name__)

OutputSink = Callable[[list[TokenOutput]], None]
TRANSFER_POLL_MIN_S = 0.001
TRANSFER_POLL_MAX_S = 0.010
"""Bounds of the wait between two steps of an engine that only waits on KV transfers."""
STEP_LIMIT_S = 300.0
"""A step running longer than this is stuck: the worker exits for the daemon to relaunch it. Long
steps are normal up to far less (a first vLLM request that needs logprobs compiles a sampler kernel
with torch.compile: ~25 s on a CPU), and heartbeats go on during them (ProcessMetrics)."""


class EngineLoop:
    def __init__(self, engine: Backend, on_outputs: OutputSink, *, name: str = "engine") -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._inbox: queue.SimpleQueue[tuple[Callable[[Backend], Any], Future] | None] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.num_steps = 0
        self.num_transfer_waits = 0
        """Waits between two steps because the engine only waited on KV transfers."""
        self.fatal_error: BaseException | None = None
        self._step_started = 0.0
        """time.monotonic() when the running step began; 0 between steps."""

    def start(self) -> None:
        self._thread.start()

    def busy_s(self) -> float:
        """How long the step now running has run (0 between steps)."""
        started = self._step_started
        return time.monotonic() - started if started else 0.0

    def submit(self, fn: Callable[[Backend], Any]) -> Future:
        """Run fn(engine) on the engine thread before its next step."""
        future: Future = Future()
        if self._stopped.is_set():
            future.set_exception(RuntimeError("engine loop stopped"))
            return future
        self._inbox.put((fn, future))
        return future

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        waiting_since: float | None = None  # when the engine began to wait on transfers only
        try:
            while not self._stopped.is_set():
                if not self.engine.has_work():
                    timeout_s: float | None = None
                elif waiting_since is None:
                    timeout_s = 0.0
                else:
                    waited_s = time.monotonic() - waiting_since
                    timeout_s = min(TRANSFER_POLL_MAX_S, max(TRANSFER_POLL_MIN_S, waited_s / 4))
                    self.num_transfer_waits += 1
                if self._drain_inbox(timeout_s):
                    waiting_since = None  # new work or an abort: step right away
                if self._stopped.is_set():
                    break
                if self.engine.has_work():
                    self._step_started = time.monotonic()
                    outputs = self.engine.step()
                    self._step_started = 0.0
                    self.num_steps += 1
                    if outputs:
                        self._on_outputs(outputs)
                        waiting_since = None
                    elif self.engine.is_waiting_on_transfers():
                        waiting_since = waiting_since or time.monotonic()
                    else:
                        waiting_since = None
        except BaseException as exc:  # the worker reports this and exits; never die silently
            self.fatal_error = exc
            log.exception("engine loop crashed")
            self._stopped.set()
        finally:
            self._fail_pending()

    def _drain_inbox(self, timeout_s: float | None) -> bool:
        """Run every queued call; wait up to timeout_s for the first (None: forever). True if any ran."""
        if timeout_s is None:
            item = self._inbox.get()
        elif timeout_s > 0:
            try:
                item = self._inbox.get(timeout=timeout_s)
            except queue.Empty:
                return False
        else:
            item = _get_nowait(self._inbox)
        ran = item is not None
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # delivered to the caller, not raised here
                    future.set_exception(exc)
            item = _get_nowait(self._inbox)
        return ran

    def _fail_pending(self) -> None:
        while (item := _get_nowait(self._inbox)) is not None:
            if item[1].set_running_or_notify_cancel():  # (a caller that stopped waiting cancelled it)
                item[1].set_exception(RuntimeError("engine loop stopped"))


def _get_nowait(q: queue.SimpleQueue):
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


async def sweep_expired(loop: EngineLoop, interval_s: float) -> None:
    """Every interval, drop expired KV blocks (retention and tier TTLs) on the engine thread (tiers
    are engine state), so their removal events go out even when nothing touches them."""
    while loop.is_alive:
        await asyncio.sleep(interval_s)
        num = await asyncio.wrap_future(loop.submit(lambda e: e.expire()))
        if num:
            log.debug("dropped %d expired KV blocks", num)
