#!/usr/bin/env python3
"""Chaos run: `dyn bench` load against a live deployment while workers are SIGKILLed.

Needs a running deployment (`dyn up`); its daemon relaunches the killed
workers. Every --interval-s seconds one random ready worker on the local
node is killed by the pid that `dyn status --json` reports (remote workers
are skipped: their pids mean nothing here). With --baseline, the same load
runs first without kills, so the report can say what the kills added.

    python scripts/chaos.py --name tiny-local --requests 300 --interval-s 5 --baseline

Reports requests sent, completed, failed, migrated (streams that continued on
another worker) and latency; --json prints the whole report as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyn.bench import BenchConfig, Trace, TraceRequest, load_trace, run_bench  # noqa: E402

LOCAL_NODES = ("local", "head", "localhost")


def main() -> int:
    args = _parse()
    status = _status(args.name)
    urls = status.get("frontend_urls") or []  # the bound address (frontend_url may say port 0)
    url = urls[0] if urls else status.get("frontend_url")
    if not url:
        print(f"deployment {status.get('name')!r} has no frontend URL (state {status.get('state')})",
              file=sys.stderr)
        return 1
    model = args.model or _served_model(url)
    trace = (load_trace(args.trace, args.requests) if args.trace
             else _synthetic(args.requests, args.rate_rps, args.input_tokens, args.output_tokens, args.seed))
    config = BenchConfig(base_url=url, model=model, max_requests=args.requests, concurrency=args.concurrency,
                         speedup=args.speedup, api_key=args.api_key or os.environ.get("DYN_API_KEY"),
                         seed=args.seed, request_timeout_s=args.request_timeout_s)
    report = {"deployment": status.get("name"), "frontend_url": url, "interval_s": args.interval_s}
    if args.baseline:
        report["baseline"] = _summary(asyncio.run(run_bench(trace, config)).data)
    kills: list[dict] = []
    chaos = asyncio.run(_chaos(trace, config, args, kills))
    report["chaos"] = _summary(chaos.data)
    report["kills"] = kills
    if args.baseline:
        report["added_latency_ms"] = {
            key: {p: _minus(report["chaos"][key].get(p), report["baseline"][key].get(p)) for p in ("p50", "p99")}
            for key in ("ttft_ms", "e2e_ms")}
    print(json.dumps(report, indent=1) if args.json else _render(report))
    return 0 if report["chaos"]["failed"] == 0 else 2


async def _chaos(trace: Trace, config: BenchConfig, args, kills: list[dict]):
    rng = random.Random(args.seed)
    started = time.monotonic()
    bench = asyncio.create_task(run_bench(trace, config))
    try:
        next_kill = started
        while not bench.done():
            next_kill += args.interval_s  # a fixed schedule: picking a victim takes time too
            await asyncio.wait({bench}, timeout=max(0.0, next_kill - time.monotonic()))
            if bench.done():
                break
            victim = await asyncio.to_thread(_pick_victim, args.name, rng)
            if victim is None:
                kills.append({"t_s": None, "skipped": "no ready local worker with a pid"})
                continue
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                kills.append({"worker": victim["id"], "pid": victim["pid"], "role": victim.get("role"),
                              "t_s": round(time.monotonic() - started, 1)})
            except ProcessLookupError:
                kills.append({"worker": victim["id"], "pid": victim["pid"], "skipped": "already gone"})
        return await bench
    finally:
        if not bench.done():
            bench.cancel()


def _pick_victim(name: str, rng: random.Random) -> dict | None:
    workers = [w for w in _status(name).get("workers", [])
               if w.get("role") != "frontend" and w.get("state") == "ready" and w.get("pid")
               and w.get("node") in LOCAL_NODES + (os.uname().nodename,)]
    return rng.choice(workers) if workers else None


def _status(name: str | None) -> dict:
    """`dyn status --json`, asked in-process: a `dyn status` subprocess takes seconds on a loaded
    host, which stretched the kill interval far past --interval-s."""
    from dyn.deploy.inspect import resolve_name, status
    from dyn.errors import DynError

    try:
        return status(resolve_name(name))
    except DynError as exc:
        raise SystemExit(f"dyn status failed: {exc}") from None


def _served_model(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def _synthetic(n: int, rate_rps: float, input_tokens: int, output_tokens: int, seed: int) -> Trace:
    rng = random.Random(seed)
    t, requests = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        requests.append(TraceRequest(t, max(1, int(rng.uniform(0.5, 1.5) * input_tokens)),
                                     max(1, int(rng.uniform(0.5, 1.5) * output_tokens))))
    return Trace(tuple(requests), 0, f"poisson({rate_rps:g} rps)")


def _summary(data: dict) -> dict:
    keys = ("requests", "completed", "failed", "not_sent", "migrated", "duration_s", "ttft_ms", "e2e_ms", "errors")
    return {k: data.get(k) for k in keys}


def _ms(report: dict, key: str) -> str:
    values = report.get(key) or {}
    return "/".join("-" if values.get(p) is None else f"{values[p]:.0f}" for p in ("p50", "p99"))


def _minus(a, b):
    return None if a is None or b is None else round(a - b, 1)


def _render(report: dict) -> str:
    c = report["chaos"]
    lines = [f"chaos on {report['deployment']} ({report['frontend_url']}), a kill every {report['interval_s']:g} s",
             f"  kills: {sum('skipped' not in k for k in report['kills'])} "
             f"({', '.join(k['worker'] for k in report['kills'] if 'worker' in k and 'skipped' not in k) or '-'})",
             f"  requests sent {c['requests'] + (c['not_sent'] or 0)}, completed {c['completed']}, failed {c['failed']},"
             f" migrated {c['migrated']}",
             f"  ttft p50/p99 {_ms(c, 'ttft_ms')} ms;"
             f" e2e p50/p99 {_ms(c, 'e2e_ms')} ms"]
    if "added_latency_ms" in report:
        added = report["added_latency_ms"]
        lines.append(f"  added by the kills: ttft p50 {added['ttft_ms']['p50']} ms, p99 {added['ttft_ms']['p99']} ms;"
                     f" e2e p50 {added['e2e_ms']['p50']} ms, p99 {added['e2e_ms']['p99']} ms")
    if c.get("errors"):
        lines.append(f"  errors: {c['errors']}")
    return "\n".join(lines)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="deployment (default: the only one)")
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between kills")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate-rps", type=float, default=10.0, help="synthetic arrival rate")
    p.add_argument("--input-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--trace", help="a Mooncake .jsonl / Azure .csv trace instead of synthetic load")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", help="served model name (default: from /v1/models)")
    p.add_argument("--api-key", help="bearer token (default: $DYN_API_KEY)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="run the same load without kills first")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.interval_s <= 0 or args.requests < 1 or args.rate_rps <= 0:
        p.error("--interval-s and --rate-rps must be > 0 and --requests >= 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
