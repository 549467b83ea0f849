#!/usr/bin/env python3
"""Soak a running deployment: replay a trace in rounds for N minutes, then report
requests lost, p99 drift per round and RSS growth of every process (after warm-up).

Usage:
  dyn up -r recipes/mock-local.yaml --name soak
  python scripts/soak.py --name soak --minutes 30 --trace ../shared/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv --speedup 10

Processes must run on this machine (RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from dyn.bench.runner import BenchConfig, run_bench
from dyn.bench.trace import load_trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--output-scale", type=float, default=0.25)
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--round-requests", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    status = _status(args.name)
    pids = {w["id"]: w["pid"] for w in status["workers"] if w.get("pid")}
    pids["daemon"] = status["daemon"]["pid"]
    model = _model(args.name)
    trace = load_trace(args.trace, args.round_requests)
    deadline = time.monotonic() + args.minutes * 60
    rounds, baseline_rss = [], None
    while time.monotonic() < deadline - 10:
        config = BenchConfig(base_url=status["frontend_url"], model=model, speedup=args.speedup,
                             concurrency=args.concurrency, block_tokens=args.block_tokens,
                             output_scale=args.output_scale,
                             max_duration_s=max(10.0, deadline - time.monotonic()))
        report = asyncio.run(run_bench(trace, config)).to_json()
        rss = {pid_id: _rss(pid) for pid_id, pid in pids.items()}
        if baseline_rss is None:
            baseline_rss = rss  # after the first round: warm-up allocations are done
        rounds.append({"requests": report["requests"], "failed": report["failed"],
                       "migrated": report.get("migrated", 0), "throughput_rps": report["throughput_rps"],
                       "ttft_p99_ms": report["ttft_ms"]["p99"], "e2e_p99_ms": report["e2e_ms"]["p99"],
                       "errors": report.get("errors", {})})
        print(json.dumps(rounds[-1]), file=sys.stderr)
    final_rss = {pid_id: _rss(pid) for pid_id, pid in pids.items()}
    growth = {pid_id: (final_rss[pid_id] / baseline_rss[pid_id] - 1.0) if baseline_rss[pid_id] else None
              for pid_id in pids}
    summary = {"minutes": args.minutes, "rounds": rounds,
               "requests": sum(r["requests"] for r in rounds), "failed": sum(r["failed"] for r in rounds),
               "rss_mib_after_warmup": {k: round(v / 2**20, 1) for k, v in baseline_rss.items()},
               "rss_mib_final": {k: round(v / 2**20, 1) for k, v in final_rss.items()},
               "rss_growth": {k: None if v is None else round(v, 4) for k, v in growth.items()}}
    print(json.dumps(summary, indent=1))
    return 0


def _status(name: str) -> dict:
    out = subprocess.run(["dyn", "status", "--name", name, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _model(name: str) -> str:
    from dyn.config.loader import parse_recipe
    from dyn.planner.state import StateStore

    deployment = StateStore(name).load_deployment()
    return parse_recipe(deployment.recipe_text, deployment.recipe_source).model.served_name


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
