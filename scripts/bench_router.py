"""Router speed: route decision time and event ingestion, at 8 / 72 / 576 workers.

For each worker count: fill the index through KV event batches to ~1M
distinct blocks (36-block sequences that share 4-block "system prompt"
prefixes, each stored on one or two workers), then time
  * ingestion: blocks/s and µs per 36-block `stored` batch (Router.apply_events,
    validation included),
  * lookup: KvIndex.find for a 36-block prompt (p50/p99),
  * decision: Router.choose with every worker as a candidate (p50/p99),
and print one JSON line per worker count. Each figure is given twice: wall
clock (`*_us`) and this thread's CPU time (`*_cpu_us`); on a shared machine
the wall-clock tail is mostly time the process spent descheduled, so the
line also records the load average.

QUOTED, NOT MEASURED: a figure for Dynamo's Rust radix tree called from
Python (a 36-block lookup over 8 workers x 4,000 sequences in 60 µs p50 /
106 µs p99; storing a 36-block sequence in 153 µs) came into this repository
with its first commit without a recorded source or machine, and this script
does not run Dynamo. It is not a comparison: a different tree size, machine
and load. To compare, measure the peer beside us on the same machine
(../shared/peers runs Dynamo here). Each output line says so in `reference`.

Run: .venv/bin/python scripts/bench_router.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import time

from dyn.config.recipe import RouterSpec
from dyn.kv.events import KvEvent
from dyn.router import KvEventBatch, RouteRequest, Router, WorkerLoad

QUOTED_REFERENCE = {
    "peer": "Dynamo radix tree (Rust, from Python)", "measured_here": False,
    "source": "quoted in this repository's first commit; source and machine not recorded",
    "lookup_36_blocks_us": {"p50": 60, "p99": 106}, "store_36_blocks_us": 153,
    "tree": "8 workers x 4,000 sequences (ours: --blocks distinct blocks)",
}
"""Shown with every line so a reader never takes it for a same-run comparison."""
SEQ_BLOCKS = 36
PREFIX_BLOCKS = 4
NUM_PREFIXES = 1000


def build(num_workers: int, target_blocks: int, rng: random.Random):
    router = Router(RouterSpec(), block_size=16, seed=0)
    workers = [f"w{i}" for i in range(num_workers)]
    seqs = [0] * num_workers
    prefixes = [[rng.getrandbits(64) for _ in range(PREFIX_BLOCKS)] for _ in range(NUM_PREFIXES)]
    sequences: list[list[int]] = []
    store_ns: list[int] = []
    store_cpu_ns: list[int] = []
    stored_blocks = 0
    while len(router.index) < target_blocks:
        seq = prefixes[rng.randrange(NUM_PREFIXES)] + [rng.getrandbits(64)
                                                       for _ in range(SEQ_BLOCKS - PREFIX_BLOCKS)]
        sequences.append(seq)
        for worker_idx in rng.sample(range(num_workers), 1 + (rng.random() < 0.3)):
            batch = KvEventBatch(workers[worker_idx], seqs[worker_idx], [KvEvent("stored", seq, None)])
            seqs[worker_idx] += 1
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            router.apply_events(batch)
            store_cpu_ns.append(time.thread_time_ns() - c0)
            store_ns.append(time.perf_counter_ns() - t0)
            stored_blocks += SEQ_BLOCKS
    return router, workers, sequences, (store_ns, store_cpu_ns), stored_blocks


def pct(values: list[int], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round((len(ordered) - 1) * p / 100)))] / 1e3


def _pcts(values: list[int]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 1), "p99": round(pct(values, 99), 1)}


def run(num_workers: int, target_blocks: int, num_queries: int, seed: int) -> dict:
    rng = random.Random(seed)
    gc.collect()
    t0 = time.perf_counter()
    router, workers, sequences, (store_ns, store_cpu_ns), stored_blocks = build(
        num_workers, target_blocks, rng)
    build_s = time.perf_counter() - t0
    loads = [WorkerLoad(w, waiting_prefill_tokens=rng.randrange(0, 4096),
                        active_decode_blocks=rng.randrange(0, 2000), num_running=rng.randrange(0, 64))
             for w in workers]
    queries = []
    for _ in range(num_queries):
        seq = rng.choice(sequences)
        cut = rng.choice((SEQ_BLOCKS, SEQ_BLOCKS, rng.randrange(PREFIX_BLOCKS, SEQ_BLOCKS)))
        queries.append(seq[:cut] + [rng.getrandbits(64) for _ in range(SEQ_BLOCKS - cut)])
    requests = [RouteRequest(q, SEQ_BLOCKS * 16) for q in queries]
    gc.disable()  # time the router, not a collection that 1M live objects would trigger
    try:
        find_ns, find_cpu_ns, choose_ns, choose_cpu_ns = [], [], [], []
        index = router.index
        for q in queries:
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            index.find(q)
            find_cpu_ns.append(time.thread_time_ns() - c)
            find_ns.append(time.perf_counter_ns() - t)
        for i, req in enumerate(requests):
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            router.choose(req, loads, now=float(i))
            choose_cpu_ns.append(time.thread_time_ns() - c)
            choose_ns.append(time.perf_counter_ns() - t)
    finally:
        gc.enable()
    return {
        "workers": num_workers,
        "indexed_blocks": len(router.index),
        "stored_blocks": stored_blocks,
        "build_s": round(build_s, 1),
        "ingest_blocks_per_s": round(stored_blocks / (sum(store_ns) / 1e9)),
        "ingest_blocks_per_cpu_s": round(stored_blocks / (sum(store_cpu_ns) / 1e9)),
        "store_36_blocks_us": _pcts(store_ns),
        "store_36_blocks_cpu_us": _pcts(store_cpu_ns),
        "lookup_36_blocks_us": _pcts(find_ns),
        "lookup_36_blocks_cpu_us": _pcts(find_cpu_ns),
        "decision_us": _pcts(choose_ns),
        "decision_cpu_us": _pcts(choose_cpu_ns),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "reference": QUOTED_REFERENCE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 72, 576])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for num_workers in args.workers:
        print(json.dumps(run(num_workers, args.blocks, args.queries, args.seed)), flush=True)


if __name__ == "__main__":
    main()
