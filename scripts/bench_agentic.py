"""Multi-turn agentic replay: next-turn TTFT and prefix hits with and without agent hints.

Sessions come from the Mooncake conversation trace: a request whose hash ids extend an
earlier request's full blocks (all but its last, partial, block) continues that conversation. Each turn's prompt is the previous prompt,
the previous answer (as the worker generated it) and the new hash blocks of the trace
(`--tokens-per-hash` tokens each). Sessions run concurrently with a think time between
turns, over `--workers` mock workers (live clock, modelled step times) whose KV pools are
too small for every session (memory pressure). Modes:

    a  no hints
    b  session + retention hints
    c  b plus speculative prefill
    p  priority: open-loop arrivals at --load x measured capacity, 10% high priority;
       TTFT p50/p99 of high vs low against the recipe's planner.ttft_ms

Other tenants' one-shot requests (`--background` clients, no hints) share the pools, as
agents share a cluster in practice: that traffic is what evicts a session's KV between turns.

    nice -n 10 .venv/bin/python scripts/bench_agentic.py --modes abcabcabcpp   # ~4 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from dyn.bench.local_cluster import LocalCluster
from dyn.config.recipe import KvTiersSpec, MockTiming, ModelSpec, Recipe, RouterSpec, WorkerGroup

ROOT = Path(__file__).resolve().parents[1]
TRACE = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared")
              if (p / "traces").is_dir()), ROOT.parent / "shared") / "traces/mooncake/conversation_trace.jsonl"
"""shared/ beside the checkout (CI) or one level up (engineers' worktrees)."""


def load_sessions(path: Path, num_sessions: int, max_turns: int, max_requests: int = 12100) -> list[list[list[int]]]:
    """Chains of hash-id lists where each extends the previous one (longest chains first)."""
    rows = [json.loads(line) for _, line in zip(range(max_requests), path.open())]
    chains: list[list[list[int]]] = []
    tails: dict[tuple[int, ...], int] = {}  # full blocks of a chain's last turn -> chain
    for row in rows:
        ids = row["hash_ids"]
        parent = None
        for cut in range(len(ids) - 1, 1, -1):
            parent = tails.pop(tuple(ids[:cut]), None)
            if parent is not None:
                break
        if parent is None:
            chains.append([ids])
            parent = len(chains) - 1
        else:
            chains[parent].append(ids)
        tails[tuple(ids[:-1])] = parent
    multi = sorted((c for c in chains if len(c) >= 2), key=len, reverse=True)
    return [c[:max_turns] for c in multi[:num_sessions]]


def run_mode(mode: str, sessions, args) -> dict:
    recipe = _recipe(args)
    ttfts, hits, prompts = [], 0, 0
    bg_ttfts: list[float] = []
    lock = threading.Lock()
    with _served(recipe, args.workers) as cluster:
        def one(sid: int, chain) -> None:
            nonlocal hits, prompts
            prompt: list[int] = []
            seen = 0
            for turn, ids in enumerate(chain):
                # The previous turn's partial last block is completed by its answer.
                new = ids[seen:] if turn else ids
                seen = len(ids)
                for h in new:
                    prompt += [(h * 131 + k) % 30000 + 256 for k in range(args.tokens_per_hash)]
                if len(prompt) + args.output_tokens > args.max_context_tokens:
                    break  # the rest of this conversation does not fit one worker's pool
                ext: dict = {}
                if mode in ("b", "c"):
                    ext = {"session_id": f"s{sid}", "retention": {"priority": 2},
                           "close_session": turn == len(chain) - 1}
                if mode == "c":
                    ext["speculative_prefill"] = True
                ttft, cached, out = _stream(cluster.base_url, prompt, args.output_tokens, ext)
                if turn:
                    with lock:
                        ttfts.append(ttft)
                        hits += cached
                        prompts += len(prompt)
                prompt = prompt + out
                time.sleep(args.think_s)

        stop = threading.Event()

        def background(idx: int) -> None:
            """Other tenants' one-shot requests (no hints): they compete for the same KV pools."""
            k = 0
            while not stop.is_set():
                k += 1
                tokens = [(idx * 7919 + k * 104729 + j) % 30000 + 256 for j in range(args.background_tokens)]
                try:
                    bg_ttfts.append(_stream(cluster.base_url, tokens, 8, {}, want_ids=False)[0])
                except OSError:
                    pass
                time.sleep(args.background_gap_s)

        bg = [threading.Thread(target=background, args=(i,)) for i in range(args.background)]
        for t in bg:
            t.start()
        threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(sessions)]
        for t in threads:
            t.start()
            time.sleep(args.stagger_s)
        for t in threads:
            t.join()
        stop.set()
        for t in bg:
            t.join()
    ttfts.sort()
    return {"mode": mode, "next_turns": len(ttfts), "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "prefix_hit_rate": round(hits / max(prompts, 1), 3),
            "background_requests": len(bg_ttfts),
            "background_ttft_p50_ms": 1000 * statistics.median(bg_ttfts) if bg_ttfts else None}


def run_priority(args) -> dict:
    """Open-loop Poisson arrivals at `--load` x measured capacity; 10% high priority."""
    import random

    recipe = _recipe(args)
    rng = random.Random(7)
    with _served(recipe, args.workers) as cluster:
        capacity = _capacity(cluster, args)
        rate = args.load * capacity
        results: dict[int, list[float]] = {0: [], 10: []}
        lock = threading.Lock()

        def one(k: int, priority: int) -> None:
            tokens = [(k * 7919 + j) % 30000 + 256 for j in range(args.priority_tokens)]
            ttft = _stream(cluster.base_url, tokens, 16, {"priority": priority}, want_ids=False)[0]
            with lock:
                results[priority].append(ttft)

        threads = []
        start = time.perf_counter()
        t = 0.0
        for k in range(int(rate * args.priority_duration_s)):
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(k, 10 if rng.random() < 0.1 else 0))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()

    def p(values: list[float], q: float) -> float:
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))]

    return {"mode": "priority", "capacity_rps": round(capacity, 1), "rate_rps": round(rate, 1),
            "high": len(results[10]), "low": len(results[0]),
            "high_ttft_p50_ms": p(results[10], 0.5), "high_ttft_p99_ms": p(results[10], 0.99),
            "low_ttft_p50_ms": p(results[0], 0.5), "low_ttft_p99_ms": p(results[0], 0.99),
            "target_ttft_ms": recipe.planner.ttft_ms}


def _capacity(cluster, args) -> float:
    """Requests/s the workers sustain, closed loop with many clients (prefill bound)."""
    done = []
    stop = time.perf_counter() + args.capacity_s

    def client(idx: int) -> None:
        k = 0
        while time.perf_counter() < stop:
            k += 1
            tokens = [(idx * 104729 + k * 7919 + j) % 30000 + 256 for j in range(args.priority_tokens)]
            _stream(cluster.base_url, tokens, 16, {}, want_ids=False)
            done.append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8 * args.workers)]
    begin = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(done) / (time.perf_counter() - begin)


class _Served:
    base_url: str


@contextlib.contextmanager
def _served(recipe: Recipe, num_workers: int):
    """The cluster in its own process: clients here never compete with it for one GIL."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, recipe, num_workers), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the local cluster did not start within 60 s")
        served = _Served()
        served.base_url = parent.recv()
        yield served
    finally:
        parent.send("stop")
        proc.join(20)
        if proc.is_alive():
            proc.kill()


def _serve(conn, recipe: Recipe, num_workers: int) -> None:
    with LocalCluster(recipe, num_workers=num_workers) as cluster:
        conn.send(cluster.base_url)
        conn.recv()


def _recipe(args) -> Recipe:
    timing = MockTiming(prefill_base_s=0.002, prefill_s_per_token=args.prefill_s_per_token,
                        decode_base_s=0.004, decode_s_per_seq=0.0001, num_kv_blocks=args.kv_blocks)
    return Recipe(name="agentic", model=ModelSpec(path="/nonexistent/mock", engine="mock", block_size=16,
                                                  max_context=16384, mock=timing),
                  workers=(WorkerGroup("both", max_batch_size=32,
                                       max_num_batched_tokens=args.max_num_batched_tokens),),
                  router=RouterSpec(admission=False), kv_tiers=KvTiersSpec(retention_ttl_s=600))


def _stream(base_url: str, prompt: list[int], max_tokens: int, ext: dict,
            want_ids: bool = True) -> tuple[float, int, list[int]]:
    """(TTFT s, cached prompt tokens, output token ids) of one streamed completion."""
    body = {"model": "mock", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 1, "dyn": {**ext, "ignore_eos": True}}
    req = urllib.request.Request(base_url + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, cached = None, 0
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage")
            if usage:
                cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    out = _greedy_ids(prompt, max_tokens) if want_ids else []
    return ttft or 0.0, cached, out


_GREEDY_CACHE: dict = {}


def _greedy_ids(prompt: list[int], n: int) -> list[int]:
    """The mock's output depends only on its context: recompute the ids the worker sent."""
    from dyn.engine.backend import EngineRequest, SamplingParams
    from dyn.engine.mock import MockEngine

    engine = MockEngine(MockTiming(num_kv_blocks=len(prompt) // 16 + n // 16 + 4), block_size=16,
                        max_context=16384, clock="virtual")
    engine.add_request(EngineRequest("g", list(prompt), SamplingParams(max_tokens=n, ignore_eos=True)))
    out: list[int] = []
    while engine.has_work():
        for o in engine.step():
            out += o.token_ids
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=256, help="per worker: memory pressure")
    p.add_argument("--tokens-per-hash", type=int, default=16)
    p.add_argument("--max-context-tokens", type=int, default=2000,
                   help="a conversation stops before a turn longer than this")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--prefill-s-per-token", type=float, default=0.0002)
    p.add_argument("--think-s", type=float, default=1.0)
    p.add_argument("--stagger-s", type=float, default=0.2)
    p.add_argument("--modes", default="abcp", help="a, b, c: agentic replay modes; p: priority at --load")
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="per-step token budget: a high-priority arrival waits at most one step")
    p.add_argument("--priority-tokens", type=int, default=512)
    p.add_argument("--priority-duration-s", type=float, default=20.0)
    p.add_argument("--capacity-s", type=float, default=8.0)
    p.add_argument("--background", type=int, default=4, help="clients sending one-shot requests")
    p.add_argument("--background-tokens", type=int, default=1024)
    p.add_argument("--background-gap-s", type=float, default=0.05)
    args = p.parse_args()
    sessions = load_sessions(args.trace, args.sessions, args.max_turns)
    print(f"{len(sessions)} sessions, {sum(len(s) for s in sessions)} turns", flush=True)
    for mode in args.modes:
        result = run_priority(args) if mode == "p" else run_mode(mode, sessions, args)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
