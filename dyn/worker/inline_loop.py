"""The engine's step loop on the event loop's own thread, for engines whose step never lets go of
the GIL (the mock: pure Python, no math that runs outside the interpreter).

A thread buys such an engine nothing: only one of the two threads runs at a time, and every
hand-off costs a cross-thread future, a wake-up of the other side (a syscall) and GIL switches.
Measured on the mock worker with zero-time steps (scripts/bench_worker.py): the engine thread
spent ~40% of its CPU outside the steps. Here steps run as event-loop callbacks:

* `submit(fn)` runs fn(engine) at once (the loop thread is, by construction, between two steps)
  and returns a done asyncio future; `await asyncio.wrap_future(...)` on it does not suspend;
* while the engine has work, a callback runs steps back to back for at most `MAX_BURST_S`, then
  hands their outputs over once (one message per request per burst, as the thread hand-off did
  when the event loop woke once for several steps) and yields to I/O, so requests that arrive
  or are cancelled meanwhile are seen within one burst;
* a step with modelled time (a live mock with non-zero MockTiming) ends the burst: its outputs
  go out when that time has passed (`call_later`, never a sleep that blocks the loop), as on the
  engine thread, where the step slept before returning them. Every step's tokens are the
  engine's own: nothing is skipped or merged inside the engine.

Same interface as EngineLoop (start, submit, stop, is_alive, num_steps, fatal_error). The torch
and vLLM engines keep the thread: their steps run outside the interpreter (torch ops, vLLM's
engine core) and overlap the event loop's I/O.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from dyn.engine.backend import Backend, TokenOutput
from dyn.worker.engine_loop import TRANSFER_POLL_MAX_S, TRANSFER_POLL_MIN_S, OutputSink

log = logging.getLogger(__name__)

MAX_BURST_S = 0.002
"""Longest run of back-to-back zero-time steps before the loop serves I/O and sends their tokens."""


class InlineEngineLoop:
    def __init__(self, engine: Backend, on_outputs: OutputSink, *, name: str = "engine",
                 each_step: bool = False) -> None:
        self.engine = engine
        self.each_step = each_step
        """Hand every step's outputs over on their own, as the step ends (recipe model.mock_stream:
        per_step), instead of once per burst."""
        self.name = name
        self._on_outputs = on_outputs
        self._aio: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None
        """The scheduled next burst (None: idle, or stepping right now)."""
        self._stepping = False
        self._deferred: list[tuple[Callable[[Backend], Any], asyncio.Future]] = []
        """submit() calls made from inside a burst (an output sink): run after the step."""
        self._stopped = False
        self._polling = False
        """The scheduled burst is a transfer poll (not a modelled step's end)."""
        self._waiting_since: float | None = None
        self.num_steps = 0
        self.num_transfer_waits = 0
        self.fatal_error: BaseException | None = None
        if hasattr(engine, "pace_inline"):
            engine.pace_inline = True  # a live mock reports its step's time left instead of sleeping

    def start(self) -> None:
        self._aio = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._kick()

    def submit(self, fn: Callable[[Backend], Any]) -> asyncio.Future | concurrent.futures.Future:
        """Run fn(engine) now, between two steps; the result (or error) in a done future.
        (Everything in a worker calls this on the event loop's thread; from another thread the
        call is handed to the loop and a concurrent future returned, as EngineLoop does.)"""
        if self._aio is not None and threading.get_ident() != self._thread_id:
            handed: concurrent.futures.Future = concurrent.futures.Future()
            self._aio.call_soon_threadsafe(_chain, self.submit, fn, handed)
            return handed
        aio = self._aio or asyncio.get_running_loop()
        future = aio.create_future()
        if self._stopped:
            _fail(future, RuntimeError("engine loop stopped"))
        elif self._stepping:
            self._deferred.append((fn, future))
        else:
            _run_into(fn, self.engine, future)
            if self._polling:  # new work or an abort ends a transfer poll's wait at once
                self._handle.cancel()
                self._handle, self._polling = None, False
            self._kick()
        return future

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for _, future in self._deferred:
            _fail(future, RuntimeError("engine loop stopped"))
        self._deferred.clear()

    @property
    def is_alive(self) -> bool:
        return self._aio is not None and not self._stopped

    def busy_s(self) -> float:
        """0: steps run on the event loop, so nothing else on it (a heartbeat) sees one running."""
        return 0.0

    def _kick(self) -> None:
        """Schedule a burst if there is work and none is scheduled."""
        if (self._handle is None and not self._stepping and not self._stopped and self._aio is not None
                and self.engine.has_work()):
            self._handle = self._aio.call_soon(self._burst)

    def _burst(self) -> None:
        self._handle = None
        self._polling = False
        engine = self.engine
        outputs: list[TokenOutput] = []
        modelled_s = poll_s = 0.0
        self._stepping = True
        try:
            deadline = time.perf_counter() + MAX_BURST_S
            while engine.has_work():
                step_outputs = engine.step()
                self.num_steps += 1
                if step_outputs:
                    self._waiting_since = None
                    if self.each_step and not getattr(engine, "step_left_s", 0.0):
                        self._deliver(step_outputs)  # (between two steps: submits from the sink run now)
                    else:
                        outputs += step_outputs
                elif engine.is_waiting_on_transfers():
                    now = time.monotonic()
                    self._waiting_since = self._waiting_since or now
                    poll_s = min(TRANSFER_POLL_MAX_S, max(TRANSFER_POLL_MIN_S, (now - self._waiting_since) / 4))
                    self.num_transfer_waits += 1
                    break
                modelled_s = getattr(engine, "step_left_s", 0.0)
                if modelled_s > 0:  # a modelled step: its tokens exist once its time has passed
                    break
                if self._deferred or time.perf_counter() >= deadline:
                    break
        except BaseException as exc:  # the worker reports this and exits; never die silently
            self.fatal_error = exc
            log.exception("engine loop crashed")
            self.stop()
            return
        finally:
            self._stepping = False
        if modelled_s > 0:
            self._handle = self._aio.call_later(modelled_s, self._after_delay, outputs)
            return
        try:
            self._deliver(outputs)
        finally:
            if poll_s > 0 and self._handle is None and not self._stopped:
                # Only waiting on KV transfers: poll again a little later; new work cancels the wait.
                self._handle = self._aio.call_later(poll_s, self._burst)
                self._polling = True
            else:
                self._kick()

    def _after_delay(self, outputs: list[TokenOutput]) -> None:
        self._handle = None
        try:
            self._deliver(outputs)
        finally:
            self._kick()

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        """Hand the outputs over, then run calls submitted during the steps. An error in the sink
        is logged and the steps go on (as with EngineLoop, whose hand-off runs as a loop callback)."""
        try:
            if outputs:
                self._on_outputs(outputs)
        except Exception:
            log.exception("handing engine outputs over failed")
        finally:
            self._run_deferred()

    def _run_deferred(self) -> None:
        while self._deferred and not self._stopped:
            fn, future = self._deferred.pop(0)
            _run_into(fn, self.engine, future)


def _chain(submit: Callable, fn: Callable[[Backend], Any], handed: concurrent.futures.Future) -> None:
    """On the loop: run a call handed over from another thread, result into its concurrent future."""
    future = submit(fn)
    if future.exception() is not None:
        handed.set_exception(future.exception())
    else:
        handed.set_result(future.result())


def _run_into(fn: Callable[[Backend], Any], engine: Backend, future: asyncio.Future) -> None:
    try:
        future.set_result(fn(engine))
    except Exception as exc:  # delivered to the caller, not raised here
        _fail(future, exc)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    future.set_exception(exc)
    future.exception()  # retrieved: a fire-and-forget submit must not log "never retrieved" (as EngineLoop's don't)
