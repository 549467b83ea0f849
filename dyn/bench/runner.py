"""Replay a trace against an OpenAI-compatible endpoint and measure it (`dyn bench`).

Prompts go as token ids to `/v1/completions` (streaming, `ignore_eos`), so
requests that share trace hash ids share real prefixes. Arrivals follow the
trace, compressed by `speedup`; at most `concurrency` requests are in
flight (an arrival waits for a free slot, so a saturated server slows the
replay instead of growing an unbounded backlog). Every request has a
timeout and the whole run has a deadline.

Prefix-cache hit rate and migrations come from the frontend's Prometheus
counters, read before and after the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from dyn.bench.report import BenchReport, RequestResult, build_report
from dyn.bench.stats import read_counters
from dyn.bench.synth import PromptSynthesizer
from dyn.bench.trace import Trace, TraceRequest
from dyn.errors import DynError


HEARTBEAT_LAG_S = 1.5
"""Workers report cache counters once a second: wait that out before the final scrape."""


class BenchError(DynError):
    """The benchmark cannot run (bad option, endpoint unreachable); `field` names the option."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    """Frontend root, e.g. http://127.0.0.1:8000 (the /v1 paths are appended)."""
    model: str
    max_requests: int | None = None
    speedup: float = 1.0
    """Arrival times are divided by this (10: ten times faster than the trace)."""
    concurrency: int = 64
    block_tokens: int | None = None
    """Tokens per trace block; None: the trace's own (512 for Mooncake)."""
    input_scale: float | None = None
    """Prompt length multiplier; None: block_tokens / the trace's block size (1 for Azure)."""
    output_scale: float = 1.0
    """max_tokens = max(1, round(output_length * output_scale))."""
    max_output_tokens: int | None = None
    request_timeout_s: float = 300.0
    max_duration_s: float = 3600.0
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    """Compared with each request's mean inter-token latency."""
    slo_e2e_ms: float | None = None
    metrics_url: str | None = None
    """Prometheus endpoint; None: base_url + /metrics."""
    hit_metric: str = "dyn_prefix_cache_hit_blocks_total"
    lookup_metric: str = "dyn_prefix_cache_lookup_blocks_total"
    migrated_metric: str = "dyn_requests_migrated_total"
    api_key: str | None = None
    vocab_size: int = 32000
    seed: int = 0
    max_retries_429: int = 0
    """Retry a 429 this many times after its Retry-After (as the openai SDK does); 0: count it refused."""

    def __post_init__(self) -> None:
        checks = [("speedup", self.speedup > 0), ("concurrency", self.concurrency >= 1),
                  ("output_scale", self.output_scale > 0),
                  ("input_scale", self.input_scale is None or self.input_scale > 0),
                  ("request_timeout_s", self.request_timeout_s > 0),
                  ("max_duration_s", self.max_duration_s > 0),
                  ("max_requests", self.max_requests is None or self.max_requests >= 1),
                  ("block_tokens", self.block_tokens is None or self.block_tokens >= 1),
                  ("max_retries_429", self.max_retries_429 >= 0)]
        for name, ok in checks:
            if not ok:
                raise BenchError(f"invalid value {getattr(self, name)!r}", field=name)
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchError(f"must start with http:// or https://, got {self.base_url!r}",
                             field="base_url")


@dataclass(frozen=True, slots=True)
class BenchProgress:
    sent: int
    done: int
    failed: int
    total: int
    elapsed_s: float
    refused: int = 0


ProgressCallback = Callable[[BenchProgress], None]


@dataclass(slots=True)
class _Run:
    total: int
    started: float
    results: list[RequestResult] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    refused: int = 0


async def run_bench(trace: Trace, config: BenchConfig,
                    progress: ProgressCallback | None = None) -> BenchReport:
    """Replay `trace` against `config.base_url`; returns the report (never raises per request)."""
    requests = trace.requests[:config.max_requests] if config.max_requests else trace.requests
    synth = PromptSynthesizer(trace.block_tokens, config.block_tokens, vocab_size=config.vocab_size,
                              seed=config.seed, length_scale=config.input_scale)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    metrics_url = config.metrics_url or config.base_url.rstrip("/") + "/metrics"
    names = (config.hit_metric, config.lookup_metric, config.migrated_metric)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        before = await _scrape(session, metrics_url, names)
        run = _Run(total=len(requests), started=time.monotonic())
        slots = asyncio.Semaphore(config.concurrency)
        tasks: set[asyncio.Task] = set()

        async def one(idx: int) -> None:
            try:
                result = await _send(session, config, synth, requests[idx], idx, run.started)
            finally:
                slots.release()
            run.results.append(result)
            run.refused += result.refused
            run.failed += not result.ok and not result.refused
            if progress:
                progress(BenchProgress(run.sent, len(run.results), run.failed, run.total,
                                       time.monotonic() - run.started, run.refused))

        try:
            async with asyncio.timeout(config.max_duration_s):
                for idx, request in enumerate(requests):
                    delay = run.started + request.arrival_s / config.speedup - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await slots.acquire()
                    run.sent += 1
                    task = asyncio.create_task(one(idx))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
        except TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            done = {r.idx for r in run.results}
            for idx in range(run.sent):
                if idx not in done:
                    run.results.append(RequestResult(idx=idx, ok=False, error="cancelled: run deadline"))
        duration_s = time.monotonic() - run.started
        await asyncio.sleep(HEARTBEAT_LAG_S)  # worker counters reach the frontend with heartbeats
        after = await _scrape(session, metrics_url, names)
    counters = {name: after[name] - before[name] for name in names
                if name in after and name in before}
    return build_report(run.results, config, duration_s, counters, synth,
                        not_sent=len(requests) - run.sent)


async def _send(session: aiohttp.ClientSession, config: BenchConfig, synth: PromptSynthesizer,
                request: TraceRequest, idx: int, origin: float) -> RequestResult:
    prompt = synth.prompt_tokens(request, idx)
    max_tokens = max(1, round(request.output_length * config.output_scale))
    if config.max_output_tokens:
        max_tokens = min(max_tokens, config.max_output_tokens)
    body = {"model": config.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "dyn": {"ignore_eos": True},
            "stream_options": {"include_usage": True}}
    result = RequestResult(idx=idx, ok=False, prompt_tokens=len(prompt))
    start = time.monotonic()
    result.start_s = start - origin
    url = config.base_url.rstrip("/") + "/v1/completions"
    try:
        async with asyncio.timeout(config.request_timeout_s):
            while True:
                async with session.post(url, json=body) as resp:
                    if resp.status == 200:
                        await _read_stream(resp, result, start)
                        break
                    text = (await resp.text())[:300]
                    result.error = f"HTTP {resp.status}: {text}"
                    if resp.status != 429:
                        return result
                    wait_s = retry_after_s(resp.headers.get("Retry-After"), result.retries)
                if result.retries >= config.max_retries_429:
                    result.refused = True
                    return result
                result.retries += 1
                await asyncio.sleep(wait_s)
                result.error = None
    except TimeoutError:
        result.error = f"timeout after {config.request_timeout_s}s"
        return result
    except aiohttp.ClientError as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.e2e_s = time.monotonic() - start
    return result


RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 8.0
RETRY_AFTER_CAP_S = 60.0


def retry_after_s(header: str | None, attempt: int) -> float:
    """How long to wait before retrying a 429, as the openai SDK does: the server's Retry-After
    (seconds, at most 60), else exponential backoff from 0.5 s capped at 8 s, with up to 25% jitter off."""
    if header:
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if 0 <= value <= RETRY_AFTER_CAP_S:
            return value
    backoff = min(RETRY_INITIAL_S * 2 ** attempt, RETRY_MAX_S)
    return backoff * (1 - 0.25 * random.random())


async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, start: float) -> None:
    last = start
    chunks = 0
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            result.ok = result.error is None
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            result.error = f"bad SSE data: {data[:100]!r}"
            return
        if "error" in chunk:
            result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
            return
        ext = chunk.get("dyn") or {}
        if ext.get("migrated") or ext.get("migrations"):
            result.migrated = True
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("text") or choices[0].get("token_ids")):
            now = time.monotonic()
            if result.ttft_s is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
            chunks += 1
    else:
        result.error = result.error or "stream ended without [DONE]"
    if result.output_tokens is None:
        result.output_tokens = chunks
    result.num_chunks = chunks


async def _scrape(session: aiohttp.ClientSession, url: str, names) -> dict[str, float]:
    """Counter values, or {} when the endpoint is missing (the report then says unknown)."""
    try:
        async with asyncio.timeout(10.0):
            async with session.get(url) as resp:
                if resp.status != 200:
                    return {}
                return read_counters(await resp.text(), names)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return {}

