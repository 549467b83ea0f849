"""Router speed: route decision time and event ingestion, at 8 / 72 / 576 workers.

For each worker count: fill the index through KV event batches to ~1M
distinct blocks (36-block sequences that share 4-block "system prompt"
prefixes, each stored on one or two workers), then time
  * ingestion: blocks/s and µs per 36-block `stored` batch (Router.apply_events,
    validation included),
  * lookup: KvIndex.find for a 36-block prompt (p50/p99),
  * decision: Router.choose with every worker as a candidate (p50/p99),
and print one JSON line per worker count. Each figure is given twice: wall
clock (`*_us`) and this process's CPU time (`*_cpu_us`); on a shared machine
the wall-clock tail is mostly time the process spent descheduled, so the
line also records the load average.

The peer, measured in the same run: with --peer-python (a Python that has
`ai-dynamo-runtime`, e.g. ../shared/peers' venv, or `pip install --no-deps
ai-dynamo-runtime==1.6.1` into a venv of its own), the same stores and queries
go through Dynamo's RadixTree (Rust, called from Python) in a child process,
one after the other on the same machine: `peer` in each line. Its events are
serialized to Dynamo's JSON before the clock starts; its CPU time counts every
thread (the tree works on a background thread). It has no decision step.
Without --peer-python there is no Dynamo figure at all: a number quoted from
elsewhere (another machine, tree and load) is not a comparison.

Run: nice -n 10 .venv/bin/python scripts/bench_router.py [--peer-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import time

SEQ_BLOCKS = 36
PREFIX_BLOCKS = 4
NUM_PREFIXES = 1000


def workload(num_workers: int, target_blocks: int, num_queries: int, seed: int):
    """(stores: [(worker index, 36 hashes)], queries: [36 hashes], rng): the same for us and the peer."""
    rng = random.Random(seed)
    prefixes = [[rng.getrandbits(63) for _ in range(PREFIX_BLOCKS)] for _ in range(NUM_PREFIXES)]
    distinct: set[int] = set()
    sequences: list[list[int]] = []
    stores: list[tuple[int, list[int]]] = []
    while len(distinct) < target_blocks:
        seq = prefixes[rng.randrange(NUM_PREFIXES)] + [rng.getrandbits(63)
                                                       for _ in range(SEQ_BLOCKS - PREFIX_BLOCKS)]
        sequences.append(seq)
        distinct.update(seq)
        for worker_idx in rng.sample(range(num_workers), 1 + (rng.random() < 0.3)):
            stores.append((worker_idx, seq))
    queries = []
    for _ in range(num_queries):
        seq = rng.choice(sequences)
        cut = rng.choice((SEQ_BLOCKS, SEQ_BLOCKS, rng.randrange(PREFIX_BLOCKS, SEQ_BLOCKS)))
        queries.append(seq[:cut] + [rng.getrandbits(63) for _ in range(SEQ_BLOCKS - cut)])
    return stores, queries, rng


def pct(values: list[int], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round((len(ordered) - 1) * p / 100)))] / 1e3


def _pcts(values: list[int]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 1), "p99": round(pct(values, 99), 1)}


def _tree_timings(stored_blocks: int, store_ns: list[int], store_cpu_ns: list[int], find_ns: list[int],
                  find_cpu_ns: list[int]) -> dict:
    """The figures both trees report, named alike."""
    return {"ingest_blocks_per_s": round(stored_blocks / (sum(store_ns) / 1e9)),
            "ingest_blocks_per_cpu_s": round(stored_blocks / (sum(store_cpu_ns) / 1e9)),
            "store_36_blocks_us": _pcts(store_ns), "store_36_blocks_cpu_us": _pcts(store_cpu_ns),
            "lookup_36_blocks_us": _pcts(find_ns), "lookup_36_blocks_cpu_us": _pcts(find_cpu_ns)}


def run(num_workers: int, target_blocks: int, num_queries: int, seed: int) -> dict:
    from dyn.config.recipe import RouterSpec
    from dyn.kv.events import KvEvent
    from dyn.router import KvEventBatch, RouteRequest, Router, WorkerLoad

    gc.collect()
    stores, queries, rng = workload(num_workers, target_blocks, num_queries, seed)
    router = Router(RouterSpec(), block_size=16, seed=0)
    workers = [f"w{i}" for i in range(num_workers)]
    seqs = [0] * num_workers
    store_ns, store_cpu_ns = [], []
    t0 = time.perf_counter()
    for worker_idx, seq in stores:
        batch = KvEventBatch(workers[worker_idx], seqs[worker_idx], [KvEvent("stored", seq, None)])
        seqs[worker_idx] += 1
        t, c = time.perf_counter_ns(), time.process_time_ns()
        router.apply_events(batch)
        store_cpu_ns.append(time.process_time_ns() - c)
        store_ns.append(time.perf_counter_ns() - t)
    build_s = time.perf_counter() - t0
    stored_blocks = len(stores) * SEQ_BLOCKS
    loads = [WorkerLoad(w, waiting_prefill_tokens=rng.randrange(0, 4096),
                        active_decode_blocks=rng.randrange(0, 2000), num_running=rng.randrange(0, 64))
             for w in workers]
    requests = [RouteRequest(q, SEQ_BLOCKS * 16) for q in queries]
    gc.disable()  # time the router, not a collection that 1M live objects would trigger
    try:
        find_ns, find_cpu_ns, choose_ns, choose_cpu_ns = [], [], [], []
        index = router.index
        for q in queries:
            t, c = time.perf_counter_ns(), time.process_time_ns()
            index.find(q)
            find_cpu_ns.append(time.process_time_ns() - c)
            find_ns.append(time.perf_counter_ns() - t)
        for i, req in enumerate(requests):
            t, c = time.perf_counter_ns(), time.process_time_ns()
            router.choose(req, loads, now=float(i))
            choose_cpu_ns.append(time.process_time_ns() - c)
            choose_ns.append(time.perf_counter_ns() - t)
    finally:
        gc.enable()
    return {
        "workers": num_workers,
        "indexed_blocks": len(router.index),
        "stored_blocks": stored_blocks,
        "build_s": round(build_s, 1),
        **_tree_timings(stored_blocks, store_ns, store_cpu_ns, find_ns, find_cpu_ns),
        "decision_us": _pcts(choose_ns),
        "decision_cpu_us": _pcts(choose_cpu_ns),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def run_peer(num_workers: int, target_blocks: int, num_queries: int, seed: int) -> dict:
    """The same stores and queries through Dynamo's RadixTree (runs in the peer's Python)."""
    from importlib.metadata import version

    from dynamo._core import RadixTree  # type: ignore[import-not-found]

    stores, queries, _ = workload(num_workers, target_blocks, num_queries, seed)
    events = []
    for event_id, (worker_idx, seq) in enumerate(stores):
        data = {"stored": {"parent_hash": None, "blocks": [{"block_hash": h, "tokens_hash": h} for h in seq]}}
        events.append((worker_idx, json.dumps({"event_id": event_id, "data": data}).encode()))
    tree = RadixTree()
    store_ns, store_cpu_ns, find_ns, find_cpu_ns = [], [], [], []
    for worker_idx, payload in events:
        t, c = time.perf_counter_ns(), time.process_time_ns()
        tree.apply_event(worker_idx, payload)
        store_cpu_ns.append(time.process_time_ns() - c)
        store_ns.append(time.perf_counter_ns() - t)
    gc.disable()
    try:
        for q in queries:
            t, c = time.perf_counter_ns(), time.process_time_ns()
            tree.find_matches(q)
            find_cpu_ns.append(time.process_time_ns() - c)
            find_ns.append(time.perf_counter_ns() - t)
    finally:
        gc.enable()
    probe = tree.find_matches(queries[0]).scores
    stored_blocks = len(stores) * SEQ_BLOCKS
    return {
        "peer": f"Dynamo RadixTree (ai-dynamo-runtime {version('ai-dynamo-runtime')})", "measured_here": True,
        **_tree_timings(stored_blocks, store_ns, store_cpu_ns, find_ns, find_cpu_ns),
        "first_query_workers_matched": len(probe),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 72, 576])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", help="a Python with ai-dynamo-runtime: measure Dynamo's tree too")
    parser.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for num_workers in args.workers:
        if args.as_peer:
            print(json.dumps(run_peer(num_workers, args.blocks, args.queries, args.seed)), flush=True)
            continue
        line = run(num_workers, args.blocks, args.queries, args.seed)
        if args.peer_python:
            child = subprocess.run([args.peer_python, __file__, "--as-peer", "--workers", str(num_workers),
                                    "--blocks", str(args.blocks), "--queries", str(args.queries),
                                    "--seed", str(args.seed)], capture_output=True, text=True, check=False)
            if child.returncode != 0:
                sys.exit(f"peer run failed ({args.peer_python}):\n{child.stderr[-2000:]}")
            line["peer"] = json.loads(child.stdout.splitlines()[-1])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
