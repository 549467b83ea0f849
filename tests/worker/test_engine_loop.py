"""EngineLoop: an engine that only waits on KV transfers is stepped at a bounded rate, not spun."""

from __future__ import annotations

import threading
import time

from dyn.engine.backend import TokenOutput
from dyn.worker.engine_loop import TRANSFER_POLL_MAX_S, TRANSFER_POLL_MIN_S, EngineLoop


class _PullingEngine:
    """Has one request whose KV is in flight until `arrive` is set; then it decodes 3 tokens."""

    def __init__(self) -> None:
        self.arrive = threading.Event()
        self.num_left = 3
        self.aborted: list[str] = []

    def has_work(self) -> bool:
        return self.num_left > 0 and not self.aborted

    def step(self) -> list[TokenOutput]:
        if not self.arrive.is_set():
            return []
        self.num_left -= 1
        return [TokenOutput("r", [7], finished=self.num_left == 0)]

    def is_waiting_on_transfers(self) -> bool:
        return not self.arrive.is_set()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _run(engine: _PullingEngine, seconds: float) -> tuple[EngineLoop, list[TokenOutput]]:
    outputs: list[TokenOutput] = []
    loop = EngineLoop(engine, outputs.extend)  # type: ignore[arg-type]
    loop.start()
    time.sleep(seconds)
    return loop, outputs


def test_waiting_on_a_transfer_steps_at_a_bounded_rate_then_decodes_at_once() -> None:
    engine = _PullingEngine()
    started = time.monotonic()
    loop, outputs = _run(engine, 0.5)
    waited_s = time.monotonic() - started
    try:
        # Back to back, a step that does nothing runs ~10^5 times in 0.5 s. Paced: at most one per
        # TRANSFER_POLL_MIN_S, and backing off to one per TRANSFER_POLL_MAX_S (~60 in 0.5 s).
        assert 5 < loop.num_steps <= waited_s / TRANSFER_POLL_MIN_S + 1
        assert loop.num_steps < 2 * waited_s / TRANSFER_POLL_MAX_S + 40
        assert loop.num_transfer_waits >= loop.num_steps - 1 and not outputs
        engine.arrive.set()  # the KV landed: the next poll finds it and decoding runs without waits
        waits = loop.num_transfer_waits
        deadline = time.monotonic() + 5
        while not (outputs and outputs[-1].finished) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [o.token_ids for o in outputs] == [[7], [7], [7]] and outputs[-1].finished
        assert loop.num_transfer_waits <= waits + 1
    finally:
        loop.stop()


def test_an_abort_while_waiting_on_a_transfer_runs_and_the_loop_then_sleeps() -> None:
    engine = _PullingEngine()
    loop, _ = _run(engine, 0.2)  # backed off to TRANSFER_POLL_MAX_S by now
    try:
        before = loop.num_steps
        loop.submit(lambda e: e.abort("r")).result(timeout=5)
        assert engine.aborted == ["r"]
        time.sleep(0.05)
        assert loop.num_steps <= before + 1  # nothing left: the loop sleeps on its queue
    finally:
        loop.stop()
    assert not loop.is_alive and loop.fatal_error is None


class _SlowStepEngine:
    """One step that runs until `release` is set (a kernel compiled on first use, a huge prefill)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stepping = threading.Event()
        self.done = False

    def has_work(self) -> bool:
        return not self.done

    def step(self) -> list[TokenOutput]:
        self.stepping.set()
        self.release.wait(10)
        self.done = True
        return []

    def is_waiting_on_transfers(self) -> bool:
        return False

    def stats(self):
        from dyn.engine.backend import EngineStats

        return EngineStats(num_running=1)


def test_heartbeat_figures_go_out_during_a_long_step_saying_how_long_it_runs():
    """A heartbeat waits on the engine thread only briefly: a long step must not look like a dead worker."""
    import asyncio
    from types import SimpleNamespace

    from dyn.worker.process_metrics import STATS_WAIT_S, ProcessMetrics

    engine = _SlowStepEngine()
    host = ProcessMetrics()
    host.server = SimpleNamespace(requests_total=1, cancels_total=0, errors_total=0, num_in_flight=1,
                                  bad=SimpleNamespace(total=0))
    host.kv_events = SimpleNamespace(events_published=0)
    host.kv_bridge = host.tiers = None
    host._started_at = time.monotonic()
    engine.done = True  # no work yet: the first figures come from between two steps
    host.loop = EngineLoop(engine, lambda outputs: None)  # type: ignore[arg-type]
    host.loop.start()
    try:
        first = asyncio.run(host._engine_values())
        assert first["num_running"] == 1 and first["engine_step_s"] == 0.0
        engine.done = False
        host.loop.submit(lambda e: None)  # wake the loop: it starts the long step
        assert engine.stepping.wait(5)
        time.sleep(0.3)
        started = time.monotonic()
        during = asyncio.run(host._engine_values())
        assert time.monotonic() - started < STATS_WAIT_S + 1.0
        assert during["num_running"] == 1 and during["engine_step_s"] >= 0.3
        assert host.loop.busy_s() >= 0.3
    finally:
        engine.release.set()
        host.loop.stop()
    assert host.loop.busy_s() == 0.0
