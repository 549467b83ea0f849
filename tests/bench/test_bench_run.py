"""run_bench against a tiny fake OpenAI server on 127.0.0.1 that streams tokens."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from dyn.bench import BenchConfig, BenchError, PromptSynthesizer, Trace, TraceRequest, run_bench

BLOCK = 16
TTFT_S = 0.03
TOKEN_GAP_S = 0.004


@dataclass
class FakeServer:
    """Streams `max_tokens` one-token chunks; keeps a prefix cache to expose hit counters."""

    fail_max_tokens: int = -1
    hang_max_tokens: int = -1
    migrate_max_tokens: int = -1
    refuse_max_tokens: int = -1
    refusals_per_prompt: int = 0
    """Requests with refuse_max_tokens get 429 (Retry-After 0.05 s) this many times per prompt."""
    refused: dict[tuple[int, ...], int] = field(default_factory=dict)
    bodies: list[dict] = field(default_factory=list)
    seen_blocks: set[tuple[int, ...]] = field(default_factory=set)
    hit_blocks: int = 0
    lookup_blocks: int = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt, max_tokens = body["prompt"], body["max_tokens"]
        assert isinstance(prompt, list) and all(type(t) is int for t in prompt)
        if max_tokens == self.fail_max_tokens:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if max_tokens == self.hang_max_tokens:
            await asyncio.sleep(30)
        if max_tokens == self.refuse_max_tokens:
            key = tuple(prompt)
            if self.refused.get(key, 0) < self.refusals_per_prompt:
                self.refused[key] = self.refused.get(key, 0) + 1
                return web.json_response({"error": {"message": "over capacity"}}, status=429,
                                         headers={"Retry-After": "0.05"})
        blocks = [tuple(prompt[i:i + BLOCK]) for i in range(0, len(prompt) - BLOCK + 1, BLOCK)]
        self.lookup_blocks += len(blocks)
        for blk_idx in range(len(blocks)):
            if tuple(prompt[:(blk_idx + 1) * BLOCK]) not in self.seen_blocks:
                break
            self.hit_blocks += 1
        self.seen_blocks.update(tuple(prompt[:(i + 1) * BLOCK]) for i in range(len(blocks)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(TTFT_S)
        for i in range(max_tokens):
            if i:
                await asyncio.sleep(TOKEN_GAP_S)
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
            if max_tokens == self.migrate_max_tokens and i == 0:
                chunk["dyn"] = {"migrated": True}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": max_tokens}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def metrics(self, _: web.Request) -> web.Response:
        text = ("# TYPE dyn_prefix_cache_hit_blocks_total counter\n"
                f"dyn_prefix_cache_hit_blocks_total {self.hit_blocks}\n"
                "# TYPE dyn_prefix_cache_lookup_blocks_total counter\n"
                f"dyn_prefix_cache_lookup_blocks_total {self.lookup_blocks}\n")
        return web.Response(text=text)


@asynccontextmanager
async def serve(fake: FakeServer):
    app = web.Application()
    app.router.add_post("/v1/completions", fake.completions)
    app.router.add_get("/metrics", fake.metrics)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def make_trace() -> Trace:
    """12 requests in 3 conversations: each turn extends its conversation's prefix."""
    requests = []
    for turn in range(4):
        for conv in range(3):
            ids = (0,) + tuple(100 * (conv + 1) + k for k in range(turn + 1))
            requests.append(TraceRequest(arrival_s=turn * 1.0 + conv * 0.1,
                                         input_length=len(ids) * 512 - 100,
                                         output_length=5 + turn + conv, hash_ids=ids))
    return Trace(tuple(requests), 512, "test")


def test_run_reports_latency_throughput_failures_and_hit_rate():
    trace = make_trace()
    fake = FakeServer(fail_max_tokens=6, migrate_max_tokens=7)  # turn 0 conv 1; turn 1 conv 1 ...
    progress = []

    async def main():
        async with serve(fake) as url:
            config = BenchConfig(base_url=url, model="tiny", speedup=20.0, concurrency=4,
                                 block_tokens=BLOCK, request_timeout_s=10, slo_ttft_ms=5000)
            return await run_bench(trace, config, progress.append)

    started = time.monotonic()
    report = asyncio.run(main()).to_json()
    assert time.monotonic() - started < 10
    fails = sum(1 for r in trace.requests if r.output_length == 6)
    assert report["requests"] == 12 and report["failed"] == fails and report["completed"] == 12 - fails
    assert "HTTP 500" in next(iter(report["errors"]))
    assert report["migrated"] == sum(1 for r in trace.requests if r.output_length == 7)
    assert report["ttft_ms"]["p50"] >= TTFT_S * 1e3
    assert TOKEN_GAP_S * 1e3 <= report["itl_ms"]["p50"] < 50
    assert report["e2e_ms"]["p99"] >= report["ttft_ms"]["p99"]
    ok_outputs = sum(r.output_length for r in trace.requests if r.output_length != 6)
    assert report["output_tokens_per_s"] * report["duration_s"] == pytest.approx(ok_outputs)
    assert report["goodput_rps"] == report["throughput_rps"] > 0
    # Prompts are the synthesized token ids, with ignore_eos and streaming.
    synth = PromptSynthesizer(512, BLOCK)
    sent = {tuple(b["prompt"]) for b in fake.bodies}
    assert sent == {tuple(synth.prompt_tokens(r, i)) for i, r in enumerate(trace.requests)}
    assert all(b["stream"] and b["ignore_eos"] and b["dyn"]["ignore_eos"] for b in fake.bodies)
    assert report["prefix_hit_rate"] == fake.hit_blocks / fake.lookup_blocks
    assert 0.3 < report["prefix_hit_rate"] < 1.0
    assert [p.done for p in progress] == list(range(1, 13)) and progress[-1].failed == fails
    for key in ("p50", "p90", "p99"):
        assert key in report["ttft_ms"] and key in report["itl_ms"] and key in report["e2e_ms"]


def test_slo_misses_reduce_goodput_and_timeouts_fail_requests():
    trace = Trace(tuple(TraceRequest(0.0, 100, n) for n in (3, 4, 9)), 0, "test")  # Azure-like
    fake = FakeServer(hang_max_tokens=9)

    async def main():
        async with serve(fake) as url:
            config = BenchConfig(base_url=url, model="tiny", request_timeout_s=0.5, slo_ttft_ms=1.0,
                                 input_scale=0.5)
            return await run_bench(trace, config)

    report = asyncio.run(main()).to_json()
    assert report["failed"] == 1 and "timeout" in next(iter(report["errors"]))
    assert report["goodput_rps"] == 0.0 and report["throughput_rps"] > 0
    assert report["prefix_hit_rate"] == 0.0
    assert sorted(len(b["prompt"]) for b in fake.bodies) == [50, 50, 50]


def test_bad_options_name_the_field():
    with pytest.raises(BenchError) as err:
        BenchConfig(base_url="http://x", model="m", speedup=0)
    assert err.value.field == "speedup"
    with pytest.raises(BenchError, match="base_url"):
        BenchConfig(base_url="127.0.0.1:8000", model="m")


def test_run_is_bounded_by_max_duration_and_counts_unsent():
    trace = Trace((TraceRequest(0.0, 50, 2), TraceRequest(100.0, 50, 2)), 0, "test")
    fake = FakeServer()

    async def main():
        async with serve(fake) as url:
            return await run_bench(trace, BenchConfig(base_url=url, model="tiny", max_duration_s=0.5))

    started = time.monotonic()
    report = asyncio.run(main()).to_json()
    assert time.monotonic() - started < 5
    assert report["requests"] == 1 and report["completed"] == 1 and report["not_sent"] == 1


def test_unreachable_endpoint_fails_requests_not_the_run():
    trace = Trace((TraceRequest(0.0, 50, 2),), 0, "test")
    config = BenchConfig(base_url="http://127.0.0.1:9", model="tiny", request_timeout_s=2)
    report = asyncio.run(run_bench(trace, config)).to_json()
    assert report["failed"] == 1 and report["prefix_hit_rate"] is None
    assert "Connect" in next(iter(report["errors"]))


def test_429_is_counted_refused_not_failed_and_retried_after_retry_after():
    trace = make_trace()
    refused_reqs = sum(1 for r in trace.requests if r.output_length == 6)

    def run(max_retries: int, refusals: int) -> tuple[dict, FakeServer, tuple]:
        fake = FakeServer(refuse_max_tokens=6, refusals_per_prompt=refusals)

        async def main():
            async with serve(fake) as url:
                config = BenchConfig(base_url=url, model="tiny", speedup=50.0, concurrency=4,
                                     block_tokens=BLOCK, request_timeout_s=10,
                                     max_retries_429=max_retries)
                return await run_bench(trace, config)

        full = asyncio.run(main())
        return full.to_json(), fake, full.results

    # No retry: a 429 is "refused", apart from failures.
    report, fake, _ = run(0, 1)
    assert report["refused"] == refused_reqs and report["failed"] == 0
    assert report["completed"] == 12 - refused_reqs and report["retried_429"] == 0
    # Two retries allowed, one refusal each: every request completes after waiting Retry-After.
    report, fake, results = run(2, 1)
    assert report["refused"] == 0 and report["failed"] == 0 and report["completed"] == 12
    assert report["retried_429"] == refused_reqs
    assert len(fake.bodies) == 12 + refused_reqs
    retried = [r for r in results if r.retries]
    assert len(retried) == refused_reqs  # their latency includes the wait the server asked for
    assert all(r.ttft_s >= 0.05 + TTFT_S for r in retried)
    # Out of retries: refused after 1 + max_retries attempts.
    report, fake, _ = run(1, 5)
    assert report["refused"] == refused_reqs and report["retried_429"] == refused_reqs
    assert all(n == 2 for n in fake.refused.values())


def test_retry_after_follows_the_header_else_backs_off_exponentially():
    from dyn.bench.runner import retry_after_s

    assert retry_after_s("2", 0) == 2.0 and retry_after_s("0.25", 3) == 0.25
    for attempt, ceiling in ((0, 0.5), (1, 1.0), (2, 2.0), (6, 8.0)):
        for header in (None, "soon", "600"):  # missing, not a number, over the 60 s cap
            assert 0.75 * ceiling <= retry_after_s(header, attempt) <= ceiling
