"""The simulator: real router (same decisions as the frontend's), exact KV accounting, bench keys."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from trace_data import MOONCAKE

from dyn.bench.trace import load_trace
from dyn.config.loader import load_recipe, load_topology
from dyn.engine.profile import mock_profile
from dyn.frontend.routing import Routing
from dyn.kv.events import KvEvent
from dyn.router.events import KvEventBatch
from dyn.router.types import RouteRequest, WorkerLoad
from dyn.sim.cluster import Simulation
from dyn.sim.config import SimConfig, make_router
from dyn.sim.errors import SimError
from dyn.sim.kvcache import SimKvCache
from dyn.sim.run import load_inputs, simulate
from dyn.sim.workload import build_requests

ROOT = Path(__file__).resolve().parents[2]


def test_sim_and_frontend_routers_decide_the_same():
    """Same recorded events and loads -> same decisions (the shared-code guarantee)."""
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")

    class _Pool:
        workers: dict = {}

    live = Routing(recipe, _Pool(), seed=7).router
    sim = make_router(recipe, seed=7)
    assert type(live) is type(sim) and type(live.policy) is type(sim.policy)
    rng = random.Random(3)
    prefixes = [[rng.randrange(1 << 40) for _ in range(12)] for _ in range(4)]
    workers = ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    seqs = dict.fromkeys(workers, 0)
    for step in range(200):
        wid = rng.choice(workers)
        kind = "stored" if rng.random() < 0.8 else "removed"
        hashes = rng.choice(prefixes)[:rng.randint(1, 12)]
        batch = KvEventBatch(wid, seqs[wid], [KvEvent(kind, hashes)])
        seqs[wid] += 1
        assert live.apply_events(batch) == sim.apply_events(batch)
        loads_p = [WorkerLoad(w, "prefill", waiting_prefill_tokens=rng.randrange(5000),
                              num_waiting=rng.randrange(4)) for w in workers[:2]]
        loads_d = [WorkerLoad(w, "decode", active_decode_blocks=rng.randrange(300),
                              num_running=rng.randrange(20)) for w in workers[2:]]
        prefix = rng.choice(prefixes)[:rng.randint(0, 12)]
        request = RouteRequest(prefix + [rng.randrange(1 << 40)], (len(prefix) + 1) * 16 + rng.randrange(2000))
        a = live.choose_disagg(request, loads_p, loads_d, now=float(step))
        b = sim.choose_disagg(request, loads_p, loads_d, now=float(step))
        assert a == b


def test_kv_cache_accounting_and_events():
    cache = SimKvCache(capacity=6)
    cache.reserve([], 4)
    cache.commit([1, 2, 3])  # 3 hashed + 1 private (partial block)
    assert [(e.kind, e.block_hashes) for e in cache.take_events()] == [("stored", [1, 2, 3])]
    assert cache.lookup([1, 2, 3, 4]) == 3 and cache.num_used == 4
    cache.release([1, 2, 3], 1)
    assert cache.num_used == 0 and list(cache.lru) == [3, 2, 1]  # tail first out
    assert cache.can_reserve([1, 2], 4) and not cache.can_reserve([1, 2], 5)
    cache.reserve([1, 2], 4)  # needs room: evicts 3 (the tail), keeps the pinned prefix
    assert [(e.kind, e.block_hashes) for e in cache.take_events()] == [("removed", [3])]
    cache.commit([3, 9])
    assert cache.lookup([1, 2, 3, 9]) == 4 and cache.num_used == 6
    assert [(e.kind, sorted(e.block_hashes)) for e in cache.take_events()] == [("stored", [3, 9])]


def test_mooncake_slice_report_has_bench_keys_and_is_deterministic():
    inputs = load_inputs(ROOT / "topologies/gb200-nvl72.yaml", ROOT / "recipes/llama-3.1-70b-nvl72.yaml",
                         MOONCAKE, max_requests=150)
    assert inputs.profile.method == "public-figures"
    a = simulate(inputs, SimConfig(), time_scale=4.0)
    b = simulate(inputs, SimConfig(), time_scale=4.0)
    bench_keys = {"requests", "completed", "failed", "duration_s", "throughput_rps", "ttft_ms", "itl_ms",
                  "tpot_ms", "e2e_ms", "goodput_rps", "slo", "prefix_hit_rate", "settings", "errors"}
    assert bench_keys <= set(a) and {"gpu_seconds", "goodput_per_gpu", "decisions"} <= set(a)
    assert a["completed"] == 150 and a["failed"] == 0
    assert a["ttft_ms"] == b["ttft_ms"] and a["gpu_seconds"] == b["gpu_seconds"]
    assert 0 < a["prefix_hit_rate"] < 0.5 and a["gpu_seconds"] > 0
    assert all({"time_s", "action", "reason"} <= set(d) for d in a["decisions"])
    json.dumps(a)  # serialisable as is
    rr = simulate(inputs, SimConfig(router_policy="round-robin"), time_scale=4.0)
    assert rr["prefix_hit_rate"] < a["prefix_hit_rate"]  # the KV-aware router finds the prefixes


def test_fixed_split_and_planner_off_hold_counts():
    recipe = load_recipe(ROOT / "recipes/llama-3.1-70b-nvl72.yaml")
    topology = load_topology(ROOT / "topologies/gb200-nvl72.yaml")
    requests = build_requests(load_trace(MOONCAKE, 100), 32, time_scale=4.0)
    sim = Simulation(topology, recipe, mock_profile(recipe, topology), requests,
                     SimConfig(planner=False, num_prefill=6, num_decode=10))
    sim.run()
    assert not sim.decisions
    assert sum(w.role == "prefill" for w in sim.workers.values()) == 6
    assert sum(w.num_gpus for w in sim.workers.values()) == 6 * 2 + 10 * 4
    assert all(r.finish_s is not None for r in requests)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from dyn.sim.plot import plot_report

    report = {"timeline": [{"time_s": 5.0 * i, "prefill": 1 + i % 2, "decode": 2, "ttft_p90_s": 0.1,
                            "itl_p90_s": 0.01, "hit_rate": 0.3} for i in range(10)],
              "slo": {"ttft_ms": 300}}
    out = plot_report(report, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_handoff_cost_uses_the_live_path_table():
    """Between NVL72 racks the simulator charges what the live shuttle would use: NIXL over the
    network with NIXL, TCP without it (never NVLink's 900 GB/s); inside a rack, NVLink."""
    from dyn.config.loader import parse_recipe
    from dyn.engine.profile import mock_profile

    topology = load_topology(ROOT / "topologies/gb200-nvl72x4.yaml")
    recipe = parse_recipe("name: r\nmodel: {engine: mock, device: cuda}\nmode: disaggregated\n"
                          "workers: {prefill: {replicas: 40}, decode: {replicas: 40}}\n", "r.yaml")
    for nixl, across in ((True, 50.0), (False, 2.0)):
        sim = Simulation(topology, recipe, mock_profile(recipe), [], SimConfig(nixl=nixl))
        places = sim.placements
        pairs = {(places[p].nvlink_domain == places[d].nvlink_domain, places[p].node == places[d].node):
                 (p, d) for p in places if p.startswith("prefill") for d in places if d.startswith("decode")}
        assert sim._path_gbps(*pairs[False, False]) == across
        if nixl:
            assert sim._path_gbps(*pairs[True, False]) == 900.0  # NIXL over multi-node NVLink
        else:
            with pytest.raises(SimError, match="never|share NVLink domain"):
                sim._path_gbps(*pairs[True, False])
