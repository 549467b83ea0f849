"""InlineEngineLoop: the mock stepped on the event loop, with the same tokens, timing and control as
on an engine thread, and without blocking the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from dyn.config.recipe import MockTiming
from dyn.control.sampling import SamplingParams
from dyn.engine.backend import EngineRequest, TokenOutput
from dyn.engine.mock import MockEngine
from dyn.worker.engine_loop import TRANSFER_POLL_MIN_S
from dyn.worker.inline_loop import InlineEngineLoop

ZERO = MockTiming(prefill_base_s=0.0, prefill_s_per_token=0.0, decode_base_s=0.0, decode_s_per_seq=0.0,
                  num_kv_blocks=256)


def _request(rid: str, max_tokens: int, prompt_len: int = 40) -> EngineRequest:
    return EngineRequest(rid, [(7 * i + len(rid)) % 900 + 3 for i in range(prompt_len)],
                         SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _reference_tokens(requests: list[EngineRequest]) -> dict[str, list[int]]:
    """The same requests stepped directly on a fresh engine."""
    engine = MockEngine(ZERO)
    for request in requests:
        engine.add_request(request)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


async def _collect(loop: InlineEngineLoop, sink: list[list[TokenOutput]], rids: set[str], timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rids <= {o.request_id for batch in sink for o in batch if o.finished}:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"not finished in {timeout_s}s: {rids}")


def test_zero_time_steps_give_the_engines_tokens_in_bursts() -> None:
    requests = [_request(f"r{i}", 40) for i in range(6)]
    expected = _reference_tokens(requests)

    async def scenario() -> None:
        sink: list[list[TokenOutput]] = []
        loop = InlineEngineLoop(MockEngine(ZERO), sink.append)
        loop.start()
        for request in requests:  # submit runs between two steps and hands back a done future
            future = loop.submit(lambda e, r=request: e.add_request(r))
            assert future.done() and future.result() is None
        await _collect(loop, sink, {r.request_id for r in requests})
        got: dict[str, list[int]] = {}
        for batch in sink:
            for out in batch:
                got.setdefault(out.request_id, []).extend(out.token_ids)
        assert got == expected  # every step's token, in order, nothing skipped
        assert loop.num_steps >= 40 and len(sink) < loop.num_steps  # several steps per hand-over
        steps = loop.num_steps
        await asyncio.sleep(0.05)
        assert loop.num_steps == steps and loop.is_alive  # idle: no steps without work
        # from another thread, the call is handed to the loop (a concurrent future, as EngineLoop's)
        stats = await asyncio.to_thread(lambda: loop.submit(lambda e: e.stats()).result(5))
        assert stats.num_generated_tokens == 6 * 40
        loop.stop()
        assert not loop.is_alive
        with pytest.raises(RuntimeError, match="stopped"):
            await loop.submit(lambda e: e.stats())

    asyncio.run(scenario())


def test_modelled_step_time_passes_without_blocking_the_event_loop() -> None:
    timing = MockTiming(prefill_base_s=0.02, prefill_s_per_token=0.0, decode_base_s=0.02, decode_s_per_seq=0.0,
                        num_kv_blocks=256)

    async def scenario() -> None:
        arrivals: list[float] = []
        loop = InlineEngineLoop(MockEngine(timing), lambda outs: arrivals.extend(time.monotonic() for _ in outs))
        loop.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        loop.submit(lambda e: e.add_request(_request("r", 5)))
        while len(arrivals) < 5:
            await asyncio.sleep(0.002)
        tick_task.cancel()
        # one token per modelled step (prefill + 4 decodes, 20 ms each), each handed over at its step's end
        gaps = [b - a for a, b in zip([started] + arrivals, arrivals)]
        assert all(gap >= 0.018 for gap in gaps), gaps
        assert ticks >= 20  # ~100 ms of steps: the loop kept serving other callbacks all along
        loop.stop()

    asyncio.run(scenario())


def test_an_abort_between_steps_ends_the_request() -> None:
    timing = MockTiming(prefill_base_s=0.0, prefill_s_per_token=0.0, decode_base_s=0.005, decode_s_per_seq=0.0,
                        num_kv_blocks=256)

    async def scenario() -> None:
        sink: list[TokenOutput] = []
        engine = MockEngine(timing)
        loop = InlineEngineLoop(engine, sink.extend)
        loop.start()
        loop.submit(lambda e: e.add_request(_request("long", 1000)))
        while len(sink) < 3:
            await asyncio.sleep(0.002)
        await loop.submit(lambda e: e.abort("long"))
        await asyncio.sleep(0.03)  # at most the step that was in flight still hands over its token
        num = len(sink)
        await asyncio.sleep(0.05)
        assert len(sink) == num < 1000 and not engine.has_work()
        loop.stop()

    asyncio.run(scenario())


class _FailingEngine:
    steps_in_interpreter = True

    def __init__(self) -> None:
        self.work = False

    def has_work(self) -> bool:
        return self.work

    def step(self) -> list[TokenOutput]:
        raise ValueError("boom")

    def is_waiting_on_transfers(self) -> bool:
        return False


def test_a_step_that_raises_stops_the_loop_with_the_error() -> None:
    async def scenario() -> None:
        engine = _FailingEngine()
        loop = InlineEngineLoop(engine, lambda outs: None)  # type: ignore[arg-type]
        loop.start()
        loop.submit(lambda e: setattr(e, "work", True))
        await asyncio.sleep(0.02)
        assert isinstance(loop.fatal_error, ValueError) and not loop.is_alive

    asyncio.run(scenario())


class _PullingEngine:
    """One request whose KV is in flight until `arrived`; then it decodes one token."""

    def __init__(self) -> None:
        self.arrived = False
        self.done = False

    def has_work(self) -> bool:
        return not self.done

    def step(self) -> list[TokenOutput]:
        if not self.arrived:
            return []
        self.done = True
        return [TokenOutput("r", [7], finished=True)]

    def is_waiting_on_transfers(self) -> bool:
        return not self.arrived


def test_an_engine_waiting_on_a_transfer_is_polled_at_a_bounded_rate() -> None:
    async def scenario() -> None:
        engine = _PullingEngine()
        outputs: list[TokenOutput] = []
        loop = InlineEngineLoop(engine, outputs.extend)  # type: ignore[arg-type]
        loop.start()
        await asyncio.sleep(0.2)
        assert 3 < loop.num_steps <= 0.2 / TRANSFER_POLL_MIN_S + 1 and not outputs
        engine.arrived = True
        deadline = time.monotonic() + 2
        while not outputs and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert [o.token_ids for o in outputs] == [[7]]
        loop.stop()

    asyncio.run(scenario())


def test_a_sink_that_raises_does_not_stall_the_steps() -> None:
    async def scenario() -> None:
        seen: list[TokenOutput] = []

        def sink(outputs: list[TokenOutput]) -> None:
            seen.extend(outputs)
            raise RuntimeError("sink bug")

        loop = InlineEngineLoop(MockEngine(ZERO), sink)
        loop.start()
        loop.submit(lambda e: e.add_request(_request("a", 2000)))  # many bursts' worth of steps
        deadline = time.monotonic() + 10
        while not any(o.finished for o in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sum(len(o.token_ids) for o in seen) == 2000 and seen[-1].finished and loop.is_alive
        loop.stop()

    asyncio.run(scenario())


def test_per_step_hand_over_sends_each_steps_tokens_on_their_own() -> None:
    requests = [_request(f"r{i}", 20) for i in range(3)]
    expected = _reference_tokens(requests)

    async def scenario() -> None:
        sink: list[list[TokenOutput]] = []
        loop = InlineEngineLoop(MockEngine(ZERO), sink.append, each_step=True)  # model.mock_stream: per_step
        loop.start()
        for request in requests:
            loop.submit(lambda e, r=request: e.add_request(r))
        await _collect(loop, sink, {r.request_id for r in requests})
        assert len(sink) == loop.num_steps  # one hand-over per step
        assert all(len(out.token_ids) == 1 for batch in sink for out in batch)  # one token per request each
        got: dict[str, list[int]] = {}
        for batch in sink:
            for out in batch:
                got.setdefault(out.request_id, []).extend(out.token_ids)
        assert got == expected
        loop.stop()

    asyncio.run(scenario())
