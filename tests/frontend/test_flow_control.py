"""Client disconnects cancel on the worker; full workers push back with 503 + Retry-After."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from frontend_harness import MODEL, Harness, make_recipe


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


async def _read_some_then_drop(url: str, body: dict, num_chunks: int) -> list[bytes]:
    got = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    got.append(line)
                if len(got) >= num_chunks:
                    break  # leaving the block closes the connection mid-stream
    return got


def test_disconnect_mid_stream_cancels_on_worker():
    with Harness(make_recipe(), [("w0", "both")], step_s=0.02) as h:
        url = f"http://127.0.0.1:{h.port}/v1/completions"
        body = {"model": MODEL, "prompt": "long story", "max_tokens": 300, "stream": True}
        chunks = asyncio.run(_read_some_then_drop(url, body, 3))
        assert len(chunks) == 3
        worker = h.workers["w0"]
        assert _wait_for(lambda: worker.cancels), "the worker never saw a Cancel"
        rid = worker.requests[0].request_id
        assert worker.cancels == [rid]
        assert _wait_for(lambda: worker.finished.get(rid) == "abort")
        assert _wait_for(lambda: not worker.active)
        assert _wait_for(lambda: h.pool.num_open_streams == 0)
        assert 'dyn_frontend_cancelled_total{reason="disconnect"} 1.0' in h.frontend.metrics.render().decode()


def test_disconnect_non_streaming_cancels_on_worker():
    async def go(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 300}))
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with Harness(make_recipe(), [("w0", "both")], step_s=0.02) as h:
        asyncio.run(go(f"http://127.0.0.1:{h.port}/v1/completions"))
        worker = h.workers["w0"]
        assert _wait_for(lambda: len(worker.cancels) == 1)
        assert _wait_for(lambda: worker.finished.get(worker.cancels[0]) == "abort")


def test_backpressure_503_with_retry_after_when_all_queues_full():
    recipe = make_recipe(max_queue=1, max_batch_size=1)

    async def go(url: str):
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "slow", "max_tokens": 100, "stream": True}
            held = [await s.post(url, json=body) for _ in range(4)]  # 2 per worker: 1 running + 1 queued
            assert [r.status for r in held] == [200] * 4
            async with s.post(url, json={"model": MODEL, "prompt": "more", "max_tokens": 2}) as r:
                result = r.status, r.headers.get("Retry-After"), await r.json()
            for r in held:
                r.close()
            return result

    with Harness(recipe, [("w0", "both"), ("w1", "both")], step_s=0.05) as h:
        status, retry_after, payload = asyncio.run(go(f"http://127.0.0.1:{h.port}/v1/completions"))
        assert status == 503
        assert retry_after is not None and int(retry_after) >= 1
        assert payload["error"]["code"] == "overloaded"
        assert "queue" in payload["error"]["message"]
        assert sum(len(w.requests) for w in h.workers.values()) == 4  # the rejected one never left
        assert _wait_for(lambda: h.pool.num_open_streams == 0)


def test_worker_refusal_retries_then_503():
    with Harness(make_recipe(), [("w0", "both"), ("w1", "both")], overloaded=True) as h:
        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{h.port}/v1/completions",
                                  json={"model": MODEL, "prompt": "x", "max_tokens": 2}) as r:
                    return r.status, r.headers.get("Retry-After"), await r.json()
        status, retry_after, payload = asyncio.run(go())
        assert status == 503 and retry_after == "1"
        assert {len(w.requests) for w in h.workers.values()} == {1}  # tried both, once each
        assert h.pool.num_open_streams == 0


def test_health_is_503_without_decode_workers():
    with Harness(make_recipe("disaggregated"), [("p0", "prefill")], stall_timeout_s=0.5) as h:
        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{h.port}/health") as r:
                    health = r.status
                async with s.post(f"http://127.0.0.1:{h.port}/v1/completions",
                                  json={"model": MODEL, "prompt": "x"}) as r:
                    return health, r.status, r.headers.get("Retry-After"), await r.json()
        health, status, retry_after, payload = asyncio.run(go())
        assert health == 503 and status == 503 and retry_after
        assert payload["error"]["code"] == "no_workers"


def test_metrics_endpoint_reports_requests_and_latency():
    with Harness(make_recipe(), [("w0", "both")]) as h:
        async def go():
            async with aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{h.port}"
                for stream in (False, True):
                    async with s.post(base + "/v1/completions", json={
                            "model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": stream}) as r:
                        await r.read()
                async with s.post(base + "/v1/completions", json={"model": "nope", "prompt": "a"}) as r:
                    await r.read()
                async with s.get(base + "/metrics") as r:
                    return r.headers["Content-Type"], await r.text()
        ctype, text = asyncio.run(go())
        assert ctype.startswith("text/plain")
        assert 'dyn_frontend_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
        assert 'dyn_frontend_requests_total{endpoint="/v1/completions",status="404"} 1.0' in text
        assert "dyn_frontend_ttft_seconds_count 2.0" in text
        assert "dyn_frontend_itl_seconds_count 3.0" in text  # streaming request only
        assert "dyn_frontend_prompt_tokens_total 6.0" in text
        assert "dyn_frontend_completion_tokens_total 8.0" in text
        assert 'dyn_worker_queue_depth{role="both",worker="w0"} 0.0' in text
        assert "dyn_prefix_cache_hit_rate" in text


def test_silent_workers_are_given_up_one_after_the_other():
    with Harness(make_recipe(), [("w0", "both"), ("w1", "both")], stall_timeout_s=0.3, step_s=5.0) as h:
        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{h.port}/v1/completions",
                                  json={"model": MODEL, "prompt": "x", "max_tokens": 2}) as r:
                    return r.status, await r.json()
        status, payload = asyncio.run(go())
        assert status == 502 and "sent nothing" in payload["error"]["message"]
        for worker in h.workers.values():  # tried once each, and each told to stop
            assert len(worker.requests) == 1
            assert _wait_for(lambda w=worker: w.cancels == [w.requests[0].request_id])
        assert 'dyn_frontend_cancelled_total{reason="stall"} 2.0' in h.frontend.metrics.render().decode()
        assert h.pool.num_open_streams == 0
