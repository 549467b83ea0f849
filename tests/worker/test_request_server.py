"""RequestServer on its own: a bug met by one request fails that request and the worker serves on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import replace

import zmq
import zmq.asyncio

from dyn.config.recipe import MockTiming
from dyn.control.requests import REQUEST_CODEC, Finish, GenerateRequest, RequestFailed, TokenChunks
from dyn.control.sampling import SamplingParams
from dyn.control.sockets import Security, client_socket
from dyn.engine.mock import MockEngine
from dyn.errors import RequestError
from dyn.worker.inline_loop import InlineEngineLoop
from dyn.worker import request_server
from dyn.worker.request_server import RequestServer, engine_request

ZERO = MockTiming(prefill_base_s=0.0, prefill_s_per_token=0.0, decode_base_s=0.0, decode_s_per_seq=0.0,
                  num_kv_blocks=64)


class BuggyEngine(MockEngine):
    """Adding request "poison" raises what no handler expects (as an engine bug would)."""

    def add_request(self, request) -> None:
        if request.request_id == "poison":
            raise KeyError("a bug")
        super().add_request(request)


def _buggy_engine_request(msg):
    """engine_request, failing for request "early" before the worker registers its stream."""
    if msg.request_id == "early":
        raise ValueError("a bug")
    return engine_request(msg)


def _request(rid: str) -> bytes:
    return REQUEST_CODEC.encode(GenerateRequest(rid, [5, 6, 7, 8], SamplingParams(max_tokens=3)))


async def _replies(dealer: zmq.asyncio.Socket, until: str) -> list:
    """Messages received until `until`'s request ends (a TokenChunks frame is unpacked)."""
    got: list = []
    async with asyncio.timeout(10):
        while True:
            message = REQUEST_CODEC.decode(await dealer.recv())
            got += message.chunks if isinstance(message, TokenChunks) else [message]
            last = got[-1]
            finish = last if isinstance(last, (Finish, RequestFailed)) else getattr(last, "finish", None)
            if finish is not None and finish.request_id == until:
                return got


@contextlib.asynccontextmanager
async def _serving(engine: MockEngine, import_kv=None):
    """A RequestServer serving `engine` on an inline loop; yields (server, its task, a DEALER to it)."""
    ctx = zmq.asyncio.Context()
    security = Security()
    server = RequestServer(ctx, "127.0.0.1", security, None)
    loop = InlineEngineLoop(engine, server.on_outputs)
    loop.start()
    server.attach(loop)
    server.import_kv = import_kv
    serving = asyncio.create_task(server.serve())
    dealer = client_socket(ctx, zmq.DEALER, server.address, security)
    try:
        yield server, serving, dealer
    finally:
        serving.cancel()
        dealer.close(linger=0)
        server.close()
        ctx.destroy(linger=0)


def test_a_request_that_hits_a_bug_fails_alone_and_the_next_is_served(monkeypatch) -> None:
    monkeypatch.setattr(request_server, "engine_request", _buggy_engine_request)

    async def scenario() -> None:
        async with _serving(BuggyEngine(ZERO)) as (server, serving, dealer):
            await dealer.send(_request("poison"))
            failed = (await _replies(dealer, "poison"))[-1]
            assert isinstance(failed, RequestFailed) and failed.code == "internal" and failed.retryable
            assert "KeyError" in failed.message and server.errors_total == 1
            await dealer.send(_request("early"))
            failed = (await _replies(dealer, "early"))[-1]
            assert isinstance(failed, RequestFailed) and "ValueError" in failed.message
            await dealer.send(_request("fine"))
            chunks = await _replies(dealer, "fine")
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish.reason == "length"
            assert not serving.done() and server.num_in_flight == 0

    asyncio.run(scenario())


def test_a_kv_pull_under_way_holds_up_no_other_request_and_a_cancel_stops_it() -> None:
    """A hand-off's pull takes up to shuttle.pull_timeout_s (its prefill worker gone): meanwhile the
    worker serves other requests, and a cancel stops the pull, ends the request as aborted and frees
    its id (the frontend may send it again at once, to migrate it)."""
    from dyn.control.requests import Cancel

    pulls: list[str] = []
    stopped = asyncio.Event()

    async def pull_that_never_ends(stream, msg) -> None:
        pulls.append(msg.request_id)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise

    async def scenario() -> None:
        async with _serving(MockEngine(ZERO), pull_that_never_ends) as (server, _, dealer):
            handoff = GenerateRequest("handoff", [5, 6, 7, 8], SamplingParams(max_tokens=3), first_token=9,
                                      kv_source={"offer": "from a prefill worker that is gone"})
            await dealer.send(REQUEST_CODEC.encode(handoff))
            await dealer.send(_request("other"))
            chunks = await _replies(dealer, "other")
            assert chunks[-1].finish.reason == "length" and pulls == ["handoff"]
            await dealer.send(REQUEST_CODEC.encode(Cancel("handoff")))
            await dealer.send(_request("handoff"))  # the same id again, as a migration sends it
            aborted = await _replies(dealer, "handoff")
            assert aborted == [Finish("handoff", "abort", 4, 0)] and stopped.is_set()
            served = await _replies(dealer, "handoff")
            assert sum(len(c.token_ids) for c in served) == 3 and served[-1].finish.reason == "length"
            assert server.num_in_flight == 0

    asyncio.run(scenario())


class PreparingEngine(MockEngine):
    """Requests with a json_schema need a preparation (as a grammar compile does): it waits for
    `release`, fails for the schema "bad", and otherwise lets the request in as a plain one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.prepared: list[str] = []
        self.entered: list[str] = []

    def preparation(self, request):
        schema = request.sampling.json_schema
        if schema is None:
            return None

        def prepare() -> None:
            assert self.release.wait(10)
            if schema == '"bad"':
                raise RequestError("response_format schema cannot be used: bad", field="response_format")
            self.prepared.append(request.request_id)
        return prepare

    def add_request(self, request) -> None:
        assert request.request_id in self.prepared or request.sampling.json_schema is None
        self.entered.append(request.request_id)
        super().add_request(replace(request, sampling=replace(request.sampling, json_schema=None)))


def _structured(rid: str, schema: str = '{"type": "object"}') -> bytes:
    return REQUEST_CODEC.encode(GenerateRequest(rid, [5, 6, 7, 8], SamplingParams(max_tokens=3, json_schema=schema)))


def test_a_request_being_prepared_holds_up_no_other_and_can_be_cancelled_or_refused() -> None:
    """An engine's slow preparation of a request (a structured-output grammar's compile: up to
    seconds) runs on a thread: the worker serves other requests meanwhile, a cancel ends the
    request at once (it never reaches the engine), and a preparation's refusal is the request's."""
    from dyn.control.requests import Cancel

    async def scenario() -> None:
        engine = PreparingEngine(ZERO)
        async with _serving(engine) as (server, _, dealer):
            await dealer.send(_structured("json"))
            await dealer.send(_structured("dropped"))
            await dealer.send(_request("plain"))
            chunks = await _replies(dealer, "plain")
            assert chunks[-1].finish.reason == "length" and server.num_in_flight == 2
            await dealer.send(REQUEST_CODEC.encode(Cancel("dropped")))
            assert await _replies(dealer, "dropped") == [Finish("dropped", "abort", 4, 0)]
            await dealer.send(_structured("refused", '"bad"'))
            engine.release.set()
            replies = await _replies(dealer, "json")
            served = [r for r in replies if getattr(r, "request_id", None) == "json"]
            assert sum(len(c.token_ids) for c in served) == 3 and served[-1].finish.reason == "length"
            refused = [r for r in replies if getattr(r, "request_id", None) == "refused"]
            if not refused:
                refused = await _replies(dealer, "refused")
            assert refused[-1].code == "bad_request" and "schema" in refused[-1].message
            async with asyncio.timeout(5):
                while len(engine.prepared) < 2:  # the cancelled request's preparation still ends ...
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert sorted(engine.prepared) == ["dropped", "json"]
            assert server.num_in_flight == 0 and engine.entered == ["plain", "json"]  # ... and it never enters

    asyncio.run(scenario())
