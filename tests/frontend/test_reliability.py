"""Stalls, migration limits, retries and the circuit breaker, over HTTP against fake workers."""

from __future__ import annotations

import dataclasses
import json
import time

import aiohttp
import asyncio
import openai
import pytest
from frontend_fakes import greedy
from frontend_harness import MODEL, Harness, make_recipe

from dyn.frontend.process import heartbeat_info
from dyn.frontend.text import ByteTokenizer

PROMPT = "tell me a story"


def _expected(n: int) -> str:
    return ByteTokenizer().decode(greedy(list(PROMPT.encode()), n))


def _recipe(max_migrations: int = 3):
    recipe = make_recipe()
    return dataclasses.replace(recipe, router=dataclasses.replace(recipe.router, max_migrations=max_migrations))


def _sse(h: Harness, n: int, headers: dict | None = None, **fields) -> tuple[int, dict, list[dict]]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{h.port}/v1/completions", headers=headers or {},
                              json={"model": MODEL, "prompt": PROMPT, "max_tokens": n, "stream": True, **fields}) as r:
                raw = await r.read()
                events = [json.loads(line[6:]) for line in raw.decode().splitlines()
                          if line.startswith("data: {")]
                return r.status, r.headers.copy(), events
    return asyncio.run(go())


def test_stalled_worker_migrates_mid_stream_with_the_same_tokens():
    with Harness(_recipe(), [("w0", "both"), ("w1", "both")], stall_timeout_s=0.3, step_s=0.01) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, stream=True)
            text = []
            for chunk in stream:
                text.append(chunk.choices[0].text)
                if len(text) == 5:  # wedge whichever worker is serving it
                    for w in h.workers.values():
                        w.stall = bool(w.active)
            stalled = [wid for wid, w in h.workers.items() if w.stall]
        assert "".join(text) == _expected(30)
        assert len(stalled) == 1 and len(h.workers[stalled[0]].cancels) == 1  # the stalled copy is cancelled
        other = next(w for wid, w in h.workers.items() if wid not in stalled)
        resent = other.requests[-1]
        assert resent.prompt_token_ids[:len(PROMPT)] == list(PROMPT.encode())
        assert len(resent.prompt_token_ids) > len(PROMPT)  # the prompt plus the tokens already streamed
        metrics = h.frontend.metrics.render().decode()
        assert "dyn_requests_migrated_total 1.0" in metrics
        assert 'dyn_frontend_cancelled_total{reason="stall"} 1.0' in metrics


def test_a_stalled_request_migrates_back_to_the_same_worker_under_a_new_id():
    """The only worker wedges one request: the migration re-sends it to that same worker. The
    worker answers the cancel with an abort of the old attempt, which must not end (or migrate
    again) the new one: each attempt on a worker has its own id, and the text is exact."""
    with Harness(_recipe(), [("w0", "both")], stall_timeout_s=0.3, step_s=0.01) as h:
        worker = h.workers["w0"]
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, stream=True)
            text = []
            for chunk in stream:
                text.append(chunk.choices[0].text)
                if len(text) == 5:
                    worker.wedged = set(worker.active)
        assert "".join(text) == _expected(30)
        (first, again) = [r.request_id for r in worker.requests]
        assert again == f"{first}#1" and worker.cancels == [first]
        assert worker.finished == {first: "abort", again: "length"}
        metrics = h.frontend.metrics.render().decode()
        assert "dyn_requests_migrated_total 1.0" in metrics
        assert h.pool.num_open_streams == 0


def test_migration_limit_ends_the_stream_with_a_clear_error():
    with Harness(_recipe(max_migrations=1), [("w0", "both"), ("w1", "both")], stall_timeout_s=0.2,
                 stall_after=3) as h:
        start = time.monotonic()
        status, headers, events = _sse(h, 40, min_tokens=10)
        assert time.monotonic() - start < 10
        assert status == 200
        assert "".join(e["choices"][0]["text"] for e in events if "choices" in e) == _expected(6)
        error = events[-1]["error"]
        assert error["code"] == "migration_limit" and "router.max_migrations" in error["message"]
        assert h.pool.num_open_streams == 0
        # each re-send says how much of its prompt is the answer so far (a grammar continues after it)
        sent = sorted((r for w in h.workers.values() for r in w.requests), key=lambda r: r.resumed_tokens)
        assert [r.resumed_tokens for r in sent] == [0, 3]
        assert [r.sampling.min_tokens for r in sent] == [10, 7]  # the tokens already made count


def test_worker_that_never_answers_is_retried_then_reported():
    with Harness(_recipe(), [("w0", "both"), ("w1", "both")], stall_timeout_s=0.2, stall_after=0) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            with pytest.raises(openai.APIStatusError) as err:
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
        assert err.value.status_code == 502 and "sent nothing" in err.value.message
        assert {len(w.requests) for w in h.workers.values()} == {1}  # each tried once, with backoff
        assert "dyn_frontend_retries_total 1.0" in h.frontend.metrics.render().decode()


def test_repeated_failures_open_the_breaker_and_show_in_metrics_and_heartbeat():
    recipe = dataclasses.replace(_recipe(), router=dataclasses.replace(_recipe().router, policy="round-robin"))
    with Harness(recipe, [("w0", "both"), ("w1", "both")], stall_timeout_s=0.1, stall_after=0) as h:
        h.workers["w1"].stall_after = None
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            for i in range(6):
                out = c.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=3)
                assert out.usage.completion_tokens == 3
        breakers = h.frontend.dispatcher.routing.breakers
        assert breakers.states()["w0"] == "open"
        sent_to_w0 = len(h.workers["w0"].requests)
        assert sent_to_w0 == 3  # after 3 failures nothing more goes there
        assert 'dyn_worker_circuit_state{worker="w0"} 2.0' in h.frontend.metrics.render().decode()
        assert heartbeat_info(h.frontend, "http://x")["breakers"]["w0"] == "open"


def test_client_request_id_is_used_echoed_and_validated():
    with Harness(make_recipe(), [("w0", "both")]) as h:
        status, headers, events = _sse(h, 3, {"X-Request-Id": "client-trace-7"})
        assert status == 200 and headers["X-Request-Id"] == "client-trace-7"
        assert events[0]["id"] == "cmpl-client-trace-7"
        assert h.workers["w0"].requests[0].request_id == "client-trace-7"
        status, headers, events = _sse(h, 3, {"X-Request-Id": "bad id/with spaces"})
        assert status == 400
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            with pytest.raises(openai.BadRequestError) as err:
                c.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                     extra_headers={"X-Request-Id": "x" * 129})
            assert err.value.body["param"] == "X-Request-Id"
            raw = c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
            assert len(raw.headers["X-Request-Id"]) > 0


def test_request_waits_for_a_relaunching_worker_within_the_measured_relaunch_time():
    """Every decode worker is relaunching: a request waits for one (budget from the daemon's
    measured relaunch time, not the stall timeout) and is served once it is back."""
    with Harness(_recipe(), [("w0", "both")], stall_timeout_s=0.1) as h:
        dispatcher = h.frontend.dispatcher

        def relaunching():
            h.pool.workers["w0"].state = "starting"
            h.pool.relaunch_s = 0.6
        h.call(relaunching)
        assert dispatcher.worker_wait_s() == pytest.approx(1.5 * 0.6 + 0.1)

        async def back_later():
            await asyncio.sleep(0.4)  # well past the 0.1 s stall timeout
            h.pool.workers["w0"].state = "ready"
        h.loop.call_soon_threadsafe(lambda: h.loop.create_task(back_later()))
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            out = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
        assert out.choices[0].text == _expected(4)


def test_request_does_not_wait_when_no_worker_is_coming_back():
    with Harness(_recipe(), [("w0", "both")], stall_timeout_s=0.1) as h:
        h.call(lambda: setattr(h.pool.workers["w0"], "state", "gave_up"))
        h.pool.relaunch_s = 60.0
        assert h.frontend.dispatcher.worker_wait_s() == 0.1
        start = time.monotonic()
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=20) as c:
            with pytest.raises(openai.APIStatusError) as err:
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
        assert err.value.status_code == 503 and time.monotonic() - start < 5


def test_relaunch_wait_from_the_recipe_overrides_the_measurement():
    recipe = dataclasses.replace(_recipe(), router=dataclasses.replace(_recipe().router, relaunch_wait_s=7.0,
                                                                        breaker_failures=9))
    with Harness(recipe, [("w0", "both")], stall_timeout_s=0.1) as h:
        h.call(lambda: setattr(h.pool.workers["w0"], "state", "failed"))
        h.pool.relaunch_s = 60.0
        assert h.frontend.dispatcher.worker_wait_s() == 7.0
        assert h.frontend.dispatcher.routing.breakers.failure_threshold == 9


def test_the_daemons_worker_push_carries_the_measured_relaunch_time():
    """update_workers' relaunch_s (dyn.planner.report.relaunch_time_s) sets the frontend's wait."""
    from dyn.control.messages import Command
    from dyn.frontend.process import _apply_command

    class _NoKvEvents:
        worker_ids: set = set()

        def disconnect(self, wid):
            pass

        async def connect(self, wid, address):
            pass

    with Harness(_recipe(), [("w0", "both")], stall_timeout_s=0.1) as h:
        entry = {"id": "w0", "role": "both", "node": "n", "state": "loading",
                 "addresses": {"request": h.pool.workers["w0"].address}}
        for relaunch_s, expected in ((12.5, 12.5), ("bad", 12.5), (-1, 12.5), (4, 4.0)):
            h.call(_apply_command, Command("update_workers", {"workers": [entry], "relaunch_s": relaunch_s}),
                   h.frontend, _NoKvEvents(), asyncio.Event(), None)
            assert h.pool.relaunch_s == expected
        assert h.frontend.dispatcher.worker_wait_s() == pytest.approx(1.5 * 4.0 + 0.1)  # w0 is loading
