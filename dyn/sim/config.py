"""The simulation's settings (SimConfig), its per-tick record, and the recipe it runs.

The router and the worker counts are built here exactly as the live system
builds them, so dyn.sim.cluster only runs events.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dyn.config.recipe import Recipe
from dyn.router.router import Router
from dyn.sim.errors import SimError


@dataclass(frozen=True)
class SimConfig:
    router_policy: str | None = None
    """None: the recipe's router policy; else any name in dyn.router.POLICY_NAMES."""
    planner: bool | None = None
    """None: the recipe's planner.enabled."""
    num_prefill: int | None = None
    """Fixed split override (starting counts; with the planner off, the counts)."""
    num_decode: int | None = None
    startup_s: float = 30.0
    """Weight load time of a newly launched worker (it holds its GPUs meanwhile)."""
    nvlink_gbps: float = 900.0
    """KV handoff bandwidth of a path over NVLink (cuda_ipc, NIXL over multi-node NVLink), GB/s."""
    network_gbps: float = 50.0
    """Of a NIXL path between domains (400G NIC with RDMA), GB/s."""
    tcp_gbps: float = 2.0
    """Of a TCP path (no NIXL between domains), GB/s."""
    nixl: bool = True
    """Is NIXL installed on the simulated racks? The hand-off path of each prefill->decode pair
    is the live system's (dyn.shuttle.path.choose_path), so without NIXL a hop between domains
    costs TCP's bandwidth, not the network's."""
    fabric_handles: bool = False
    """Do CUDA fabric handles work across trays (cuda_ipc inside a multi-node NVLink domain)?"""
    retry_s: float = 0.25
    max_wait_s: float = 120.0
    """A request no worker can take for this long fails as overloaded."""
    seed: int = 0
    domain_routing: bool = False
    """One live Router per NVLink domain behind a DomainBalancer (dyn.sim.domain_routing), as a
    multi-rack site runs them; False: one Router over every worker, as one frontend does."""
    domain_affinity_tokens: int = 1024
    """Prompt depth of the balancer's affinity key (past a shared system prompt)."""
    domain_slack: float = 0.25
    """A domain takes new keys while its load is within 1 + slack of the mean."""
    block_tokens: int | None = None
    """KV accounting and routing granularity in tokens; None: the recipe's block_size. A
    multiple of it (e.g. a Mooncake trace's 512) cuts the per-block work of long prompts;
    pools shrink to the same tokens (the fidelity cost is measured in docs/scale.md)."""


@dataclass(slots=True)
class Tick:
    time_s: float
    counts: dict[str, int]
    gpus: int
    window: dict[str, float] = field(default_factory=dict)



def make_router(recipe: Recipe, policy: str | None = None, seed: int | None = None,
                block_size: int | None = None) -> Router:
    """The router exactly as the live frontend builds it (dyn.frontend.routing.Routing); a
    coarser `block_size` only when the simulation accounts KV in coarser blocks."""
    return Router(recipe.router, block_size or recipe.model.block_size, policy=policy, seed=seed)


def with_counts(recipe: Recipe, num_prefill: int | None, num_decode: int | None) -> Recipe:
    """The recipe with SimConfig's fixed worker counts (None: the recipe's own)."""
    groups = []
    for g in recipe.workers:
        want = num_prefill if g.role == "prefill" else num_decode if g.role in ("decode", "both") else None
        if want is not None and want < 0:
            raise SimError(f"must be >= 0, got {want}", field=f"{g.role} count")
        # A fixed total replaces a per-domain count; placement's pairing rule still spreads it.
        groups.append(replace(g, replicas=want, replicas_per_domain=None, replicas_per_rack=None)
                      if want is not None else g)
    return replace(recipe, workers=tuple(groups))
