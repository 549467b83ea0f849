"""The simulator routes like the live frontend: one short trace, both paths, every decision compared.

The simulation runs as usual; at each arrival the live `Routing.choose_workers`
(the frontend's path: role filters, prompt hashing, modes, breakers) is asked
too, over a worker pool mirroring the simulated workers' loads, with a router
fed the same KV events and worker removals, on the same (virtual) clock.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pytest

from dyn.config.loader import load_recipe, load_topology
from dyn.engine.profile import mock_profile
from dyn.frontend.protocol import ApiError, Hints
from dyn.frontend.routing import Routing, _load
from dyn.frontend.workers import WorkerHandle, WorkerLimits
from dyn.kv.hashing import hash_blocks
from dyn.router.errors import NoWorkerError
from dyn.router.events import KvEventBatch
from dyn.router.router import Router
from dyn.router.types import RouteChoice, RouteRequest, WorkerLoad
from dyn.sim.cluster import Simulation
from dyn.sim.config import SimConfig
from dyn.sim.workload import SimRequest

ROOT = Path(__file__).resolve().parents[2]


class _Pool:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerHandle] = {}


class _BothPaths:
    """Stands in for the simulation's router: routes through it and through the live path."""

    def __init__(self, sim_router: Router, live: Routing, prompts: dict[tuple[int, ...], list[int]]) -> None:
        self.sim_router, self.live, self.prompts = sim_router, live, prompts
        self.pairs: list[tuple[RouteChoice | None, RouteChoice | None]] = []
        self.loads_differ = 0

    def route(self, request: RouteRequest, prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad],
              now: float, *, disaggregated: bool) -> RouteChoice:
        pool = self.live.pool
        pool.workers = {ld.worker_id: _mirror(ld) for ld in (*prefill, *decode)}
        bs = self.live.block_size
        self.loads_differ += sum(_load(pool.workers[ld.worker_id], bs) != ld for ld in (*prefill, *decode))
        try:
            sim_choice: RouteChoice | None = self.sim_router.route(request, prefill, decode, now,
                                                                   disaggregated=disaggregated)
        except NoWorkerError:
            sim_choice = None
        try:
            live_choice: RouteChoice | None = self.live.choose_workers(
                self.prompts[tuple(request.block_hashes)], Hints())
        except ApiError:
            live_choice = None
        self.pairs.append((sim_choice, live_choice))
        if sim_choice is None:
            raise NoWorkerError("no worker", role=None, reasons={})
        return sim_choice

    def apply_events(self, batch: KvEventBatch) -> None:
        self.sim_router.apply_events(batch)
        self.live.router.apply_events(batch)

    def remove_worker(self, worker_id: str) -> None:
        self.sim_router.remove_worker(worker_id)
        self.live.forget(worker_id)


def _mirror(load: WorkerLoad) -> WorkerHandle:
    """A ready frontend worker handle whose heartbeat reports `load`."""
    metrics = {"num_running": float(load.num_running), "waiting_prefill_tokens": float(load.waiting_prefill_tokens),
               "kv_blocks_used": float(load.active_decode_blocks), "kv_usage": load.kv_usage,
               "kv_blocks_total": float(load.num_kv_blocks), "num_waiting": float(load.num_waiting)}
    return WorkerHandle(load.worker_id, load.role, "", "", WorkerLimits(max_queue=load.max_queue), metrics=metrics,
                        nvlink_domain=load.nvlink_domain)


def _trace(block_size: int, num: int, seed: int) -> tuple[list[SimRequest], dict[tuple[int, ...], list[int]]]:
    """Conversations that share system prompts and grow turn by turn, arriving in bursts."""
    rng = random.Random(seed)
    systems = [[rng.randrange(32_000) for _ in range(rng.randint(200, 900))] for _ in range(4)]
    histories: list[list[int]] = []
    requests, prompts, now = [], {}, 0.0
    for idx in range(num):
        if histories and rng.random() < 0.6:
            history = rng.choice(histories)
        else:
            history = list(rng.choice(systems))
            histories.append(history)
        history += [rng.randrange(32_000) for _ in range(rng.randint(20, 1500))]
        tokens = list(history)
        hashes = hash_blocks(tokens, block_size)
        prompts[tuple(hashes)] = tokens
        now += rng.expovariate(40.0)
        requests.append(SimRequest(idx, now, len(tokens), rng.randint(1, 300), hashes))
    return requests, prompts


def _aggregated(recipe):
    decode = recipe.group("decode")
    return replace(recipe, mode="aggregated", workers=(replace(decode, role="both"),))


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
@pytest.mark.parametrize("policy", [None, "round-robin"])
def test_sim_and_live_routing_decide_the_same_request_by_request(mode, policy):
    recipe = load_recipe(ROOT / "recipes/llama-3.1-8b-hgx.yaml")
    # a planner tick every second: it stops workers mid-trace (the live router forgets them too)
    recipe = replace(recipe, planner=replace(recipe.planner, interval_s=1.0, cooldown_s=2.0))
    if mode == "aggregated":
        recipe = _aggregated(recipe)
    topology = load_topology(ROOT / "topologies/hgx-h100x8.yaml")
    requests, prompts = _trace(recipe.model.block_size, 160, seed=5)
    sim = Simulation(topology, recipe, mock_profile(recipe, topology), requests,
                     SimConfig(router_policy=policy, seed=11, startup_s=2.0))
    live = Routing(sim.recipe, _Pool(), policy=policy, seed=11, clock=lambda: sim.now)  # type: ignore[arg-type]
    both = _BothPaths(sim.router, live, prompts)
    sim.router = both  # type: ignore[assignment]
    sim.run()

    assert both.loads_differ == 0  # the live pool reads the mirrored heartbeats as the sim's loads
    assert len(both.pairs) >= len(requests)
    for i, (sim_choice, live_choice) in enumerate(both.pairs):
        assert sim_choice == live_choice, f"routing call {i}"
    assert all(r.finish_s is not None for r in requests)
    assert any(d.action == "scale_down" for d in sim.decisions)
    assert any(w.state == "stopped" for w in sim.workers.values())
    decided = [p for p, _ in both.pairs if p is not None]
    if mode == "disaggregated":
        assert any(c.prefill for c in decided) and any(c.prefill is None for c in decided)
    else:
        assert all(c.prefill is None for c in decided)
    assert len({c.decode for c in decided}) > 1
    if policy is None:
        assert any(c.overlap_blocks for c in decided)  # cache-aware decisions were exercised


def test_sim_scales_through_the_daemons_scaling_actions():
    """The sim shows its workers to `scaling_actions` as the daemon shows its slots, and applies
    what comes back: a flip takes the least-loaded ready worker of the losing role, a stop the
    least-loaded (not-yet-ready first) of the shrinking one."""
    from dyn.planner.actions import counts_of, scaling_actions
    from dyn.planner.policy import Counts, Decision, PlanStep

    recipe = load_recipe(ROOT / "recipes/llama-3.1-8b-hgx.yaml")
    topology = load_topology(ROOT / "topologies/hgx-h100x8.yaml")
    sim = Simulation(topology, recipe, mock_profile(recipe, topology), [], SimConfig(planner=False))
    w = sim.workers
    w["decode-0"].incoming = 3  # busier than its peers
    w["decode-1"].state, w["decode-1"].flip_to = "flipping", "prefill"  # counts as prefill now
    w["decode-2"].state = "draining"  # counts nowhere
    w["prefill-3"].state = "starting"
    views = sim._views()
    assert counts_of(views) == Counts(5, 6)
    flip = Decision(0.0, "flip", "prefill", 1, Counts(5, 6), Counts(6, 5), "test")
    step = PlanStep(Counts(4, 5), (flip,))
    actions = scaling_actions(step, views, counts_of(views), disaggregated=True)
    assert [(a.kind, a.worker_id, a.role) for a in actions] == [
        ("set_role", "decode-3", "prefill"),  # ready, idle, lowest id; decode-0 is busy
        ("remove", "prefill-3", "prefill"),  # still starting: cheapest to stop
        ("remove", "decode-1", "prefill"),  # flipped to prefill and idle: a ready prefill worker now
    ]
    for action in actions:
        sim._apply(action)
    assert w["decode-3"].role == "prefill" and w["decode-3"].state == "ready"  # idle: flipped at once
    assert w["prefill-3"].state == "stopped" and w["decode-1"].state == "stopped"
    assert counts_of(sim._views()) == Counts(4, 5)
