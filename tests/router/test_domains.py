"""Routing across NVLink domains: the site balancer, and prefill/decode pairs inside a domain."""

from __future__ import annotations

from dyn.config.recipe import RouterSpec
from dyn.router.domains import DomainBalancer
from dyn.router.router import Router
from dyn.router.types import RouteRequest, WorkerLoad


def _pair(prefill_b_queue: int = 0):
    router = Router(RouterSpec(disagg_threshold_tokens=0), block_size=16, seed=0)
    decode = [WorkerLoad("decode-a", "decode", nvlink_domain="a")]
    prefill = [WorkerLoad("prefill-a", "prefill", waiting_prefill_tokens=50_000, nvlink_domain="a",
                          num_waiting=prefill_b_queue, max_queue=4),
               WorkerLoad("prefill-b", "prefill", nvlink_domain="b")]
    return router.choose_disagg(RouteRequest(list(range(64)), 1024), prefill, decode, now=0.0)


def test_prefill_stays_in_the_decode_workers_domain_when_it_can():
    # prefill-b is idle and prefill-a is 50k tokens behind: the pair still stays in domain a.
    assert _pair().prefill.worker_id == "prefill-a"
    # prefill-a's queue is full: crossing domains beats not prefilling remotely at all.
    assert _pair(prefill_b_queue=4).prefill.worker_id == "prefill-b"
    # Without domains (loads that do not say), the policy alone picks: the idle worker.
    router = Router(RouterSpec(disagg_threshold_tokens=0), block_size=16, seed=0)
    choice = router.choose_disagg(RouteRequest(list(range(64)), 1024),
                                  [WorkerLoad("p0", "prefill", waiting_prefill_tokens=50_000), WorkerLoad("p1", "prefill")],
                                  [WorkerLoad("d0", "decode")], now=0.0)
    assert choice.prefill.worker_id == "p1"


def test_balancer_keeps_keys_spreads_load_and_moves_few_keys():
    names = [f"d{i}" for i in range(10)]
    bal = DomainBalancer(names, block_size=32, affinity_tokens=64)
    idle = {n: 0.0 for n in names}.__getitem__
    prompts = [[k * 100 + j for j in range(5)] for k in range(2000)]
    home = [bal.choose(p, idle, 0.0) for p in prompts]
    assert home == [bal.choose(p, idle, 0.0) for p in prompts]  # same prefix, same domain
    assert bal.key(prompts[3]) == prompts[3][1] and bal.key(prompts[3][:1]) == prompts[3][0]
    counts = {n: home.count(n) for n in names}
    assert max(counts.values()) < 2.0 * min(counts.values())
    busy = home[0]
    load = {n: (50.0 if n == busy else 1.0) for n in names}
    assert bal.choose(prompts[0], load.__getitem__, 5.9) != busy  # over (1 + slack) x mean: next one
    smaller = DomainBalancer([n for n in names if n != "d3"], block_size=32, affinity_tokens=64)
    moved = sum(h != smaller.choose(p, idle, 0.0) for p, h in zip(prompts, home) if h != "d3")
    assert moved == 0  # only d3's keys move when d3 leaves


def test_the_daemons_worker_list_carries_each_workers_domain_to_the_frontend():
    import asyncio
    from pathlib import Path

    import zmq.asyncio

    from dyn.config.loader import load_topology
    from dyn.control.sockets import Security
    from dyn.frontend.routing import _load
    from dyn.frontend.workers import WorkerPool
    from dyn.planner.health import ProcessSlot
    from dyn.planner.report import worker_list

    topo = load_topology(Path(__file__).resolve().parents[2] / "topologies/gb200-nvl72x4.yaml")
    slots = [ProcessSlot(id="decode-0", role="decode", node="c-tray03", gpus=(0, 1, 2, 3), state="ready",
                         addresses={"request": "tcp://127.0.0.1:5999"}),
             ProcessSlot(id="frontend", role="frontend", node="a-tray01", gpus=())]
    entries = worker_list(slots, topo)
    assert [e["nvlink_domain"] for e in entries] == ["nvl-nvl72-c"]

    async def go():
        ctx = zmq.asyncio.Context()
        pool = WorkerPool(ctx, Security(), {})
        pool.update(entries + [{**entries[0], "id": "decode-1", "nvlink_domain": 7}])
        domains = {w: _load(h, 16).nvlink_domain for w, h in pool.workers.items()}
        pool.close()
        await asyncio.sleep(0)
        ctx.term()
        return domains
    assert asyncio.run(go()) == {"decode-0": "nvl-nvl72-c", "decode-1": None}  # a bad value is ignored
