"""The vLLM hand-off hooks: vLLM's transfer parameters ride dyn's kv_offer; an unreadable offer
costs a local prefill after the streamed first token, never the request."""

from __future__ import annotations

import asyncio

from dyn.control.requests import GenerateRequest
from dyn.control.sampling import SamplingParams
from dyn.worker.engine_loop import EngineLoop
from dyn.worker.request_server import Stream
from dyn.worker.vllm_handoff import VllmHandoff


class FakeVllm:
    """Records what the hand-off asks of the engine (on the engine thread)."""

    def __init__(self) -> None:
        self.added, self.remote, self.params = [], [], {"r1": {"remote_engine_id": "p0"}}

    def has_work(self) -> bool:
        return False

    def add_request(self, request) -> None:
        self.added.append(request)

    def add_remote_decode(self, request, params, first_token, timeout_s) -> None:
        self.remote.append((request, params, first_token, timeout_s))

    def take_transfer_params(self, rid: str) -> dict:
        return self.params.pop(rid)


def _run(fn):
    async def main():
        engine = FakeVllm()
        loop = EngineLoop(engine, lambda outputs: None)  # type: ignore[arg-type]
        loop.start()
        try:
            return engine, await fn(VllmHandoff(loop, pull_timeout_s=7.0))
        finally:
            loop.stop()
    return asyncio.run(main())


def _msg(kv_source) -> GenerateRequest:
    return GenerateRequest("r1", [5, 6, 7], SamplingParams(max_tokens=8), kv_source=kv_source, first_token=42)


def test_prefill_export_carries_vllm_transfer_params_in_the_offer():
    stream = Stream("r1", b"client", 3, prefill_only=True)
    engine, handoff = _run(lambda h: _done(h.export(stream, None), h))
    assert stream.kv_offer == {"vllm": {"remote_engine_id": "p0"}} and handoff.stats.offers == 1


def test_decode_hands_the_params_and_first_token_to_vllm():
    stream = Stream("r1", b"client", 3)
    engine, handoff = _run(lambda h: _done(h.import_and_decode(stream, _msg({"vllm": {"x": 1}})), h))
    [(request, params, first, timeout_s)] = engine.remote
    assert params == {"x": 1} and first == 42 and request.prompt_token_ids == [5, 6, 7] and timeout_s == 7.0
    assert handoff.stats.pulls == 1 and not engine.added


def test_an_offer_without_vllm_params_is_prefilled_locally_after_the_first_token():
    stream = Stream("r1", b"client", 3)
    engine, handoff = _run(lambda h: _done(h.import_and_decode(stream, _msg({"address": "tcp://x"})), h))
    [request] = engine.added
    assert request.prompt_token_ids == [5, 6, 7, 42] and request.sampling.max_tokens == 7
    assert handoff.stats.local_fallbacks == 1 and not engine.remote


async def _done(coro, handoff):
    await coro
    return handoff
