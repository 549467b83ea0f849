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
