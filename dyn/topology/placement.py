"""Placement: which GPUs (or CPU share) each worker of a recipe gets.

Deterministic: the same topology and recipe always give the same answer.
Rules, in priority order:
  * a GPU is never given to two workers;
  * a tensor-parallel group never leaves its NVLink domain and stays on one
    node when one node can hold it;
  * wide groups go first (first-fit decreasing keeps whole nodes free);
  * each worker goes to the domain with the fewest workers of its own role
    and the most of the other role, so prefill and decode pair up inside a
    domain and the KV shuttle stays on NVLink.
CPU-only topologies put workers on nodes and split each node's cores.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dyn.config.recipe import Recipe, WorkerGroup
from dyn.config.scaling import scale_to_topology
from dyn.config.topology import Node, Topology
from dyn.errors import PlacementError
from dyn.topology.pools import GpuPool, Shard, build_pools

ROLE_ORDER = ("prefill", "decode", "both")


class FitError(PlacementError):
    """The recipe does not fit the topology; fields locate the recipe line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, shortfall_gpus: int | None = None) -> None:
        self.path, self.line, self.field, self.shortfall_gpus = path, line, field, shortfall_gpus
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + (f"{field}: " if field else "") + message)


@dataclass(frozen=True)
class WorkerPlacement:
    id: str
    """Stable and readable: prefill-0, decode-3, worker-1 (role both)."""
    role: str
    node: str
    """The node the worker's process runs on (the first node of a multi-node group)."""
    gpus: tuple[int, ...]
    """GPU indices on `node`; empty on CPU."""
    nvlink_domain: str | None
    cpu_threads: int | None
    """torch threads for CPU workers; None on GPUs or when the node's cores are unknown."""
    extra_nodes: tuple[Shard, ...] = ()
    """Further (node, GPU indices) of a group wider than one node (inside one NVLink domain)."""

    @property
    def shards(self) -> tuple[Shard, ...]:
        return ((self.node, self.gpus),) + self.extra_nodes

    @property
    def gpu_keys(self) -> tuple[tuple[str, int], ...]:
        return tuple((node, idx) for node, idxs in self.shards for idx in idxs)

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_keys)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "node": self.node, "gpus": list(self.gpus),
                "nvlink_domain": self.nvlink_domain, "cpu_threads": self.cpu_threads,
                "extra_nodes": [{"node": n, "gpus": list(g)} for n, g in self.extra_nodes]}


@dataclass(frozen=True)
class Placement:
    workers: tuple[WorkerPlacement, ...]
    head: str
    """Node of the planner daemon and the frontend."""

    def used_gpus(self) -> frozenset[tuple[str, int]]:
        return frozenset(key for w in self.workers for key in w.gpu_keys)

    def of_role(self, role: str) -> tuple[WorkerPlacement, ...]:
        return tuple(w for w in self.workers if w.role == role)

    def worker(self, worker_id: str) -> WorkerPlacement:
        for w in self.workers:
            if w.id == worker_id:
                return w
        raise KeyError(worker_id)

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "workers": [w.to_dict() for w in self.workers]}


def worker_id(role: str, index: int) -> str:
    return f"{'worker' if role == 'both' else role}-{index}"


def place(topology: Topology, recipe: Recipe) -> Placement:
    """Place every worker of `recipe`; raise FitError saying how far off it is.

    A recipe with per-domain (per-rack) counts is first scaled to the topology, and each
    domain (rack) gets exactly its count of those groups."""
    recipe = scale_to_topology(recipe, topology)
    requests = [(g, i) for role in ROLE_ORDER if (g := recipe.group(role)) for i in range(g.replicas)]
    if _on_cpu(topology, recipe):
        workers = _place_cpu(topology, recipe, requests, Placement((), topology.head))
    else:
        _check_gpu_totals(topology, recipe)
        pools = build_pools(topology)
        units = _unit_pools(topology, recipe, pools)
        workers = [_place_gpu(pools, recipe, group, i, only=units.get((group.role, i)))
                   for group, i in _gpu_order(requests)]
    rank = {w.id: (ROLE_ORDER.index(w.role), int(w.id.rsplit("-", 1)[1])) for w in workers}
    return Placement(tuple(sorted(workers, key=lambda w: rank[w.id])), topology.head)


def place_one(topology: Topology, recipe: Recipe, role: str, used: Placement,
              prefer_domain: str | None = None) -> WorkerPlacement:
    """One more worker of `role` next to the running ones (the SLO planner's scale-up).

    `prefer_domain` wins when it has room; otherwise the usual pairing rule picks.
    """
    recipe = scale_to_topology(recipe, topology)
    group = recipe.group(role)  # type: ignore[arg-type]
    if group is None:
        raise FitError(f"recipe has no {role} workers to add", path=recipe.source, field="workers")
    taken = [int(w.id.rsplit("-", 1)[1]) for w in used.of_role(role)]
    index = max(taken, default=-1) + 1
    if _on_cpu(topology, recipe):
        return _place_cpu(topology, recipe, [(group, index)], used)[0]
    pools = build_pools(topology, set(used.used_gpus()))
    by_domain = {p.domain: p for p in pools}
    for w in used.workers:
        pool = by_domain.get(w.nvlink_domain) if w.nvlink_domain else _pool_of_node(pools, w.node)
        if pool is not None:
            pool.roles[w.role] += 1
    return _place_gpu(pools, recipe, group, index, prefer_domain)


def _place_gpu(pools: list[GpuPool], recipe: Recipe, group: WorkerGroup, index: int,
               prefer_domain: str | None = None, only: list[GpuPool] | None = None) -> WorkerPlacement:
    role, tp = group.role, group.tp
    if only is not None:
        fitting = [p for p in only if p.can_fit(tp)]
        if not fitting:
            key = "replicas_per_domain" if group.replicas_per_domain is not None else "replicas_per_rack"
            unit = ", ".join(p.label for p in only)
            raise _recipe_error(recipe, f"workers.{role}.{key}",
                                f"no room for {worker_id(role, index)} (tp={tp}) in {unit}: its per-unit "
                                f"groups need more GPUs than it has (free: {sum(p.num_free for p in only)})",
                                "lower the per-domain replicas or tp")
        pool = min(fitting, key=lambda p: _pairing_key(p.roles, role, p.order))
        return _take(pool, role, index, tp)
    fitting = [p for p in pools if p.can_fit(tp)]
    if not fitting:
        free = ", ".join(f"{p.label}: {p.num_free}" for p in pools)
        raise _recipe_error(recipe, f"workers.{role}",
                            f"no room for {worker_id(role, index)} (tp={tp}): no NVLink domain or node has "
                            f"{tp} free GPUs together (free GPUs: {free})",
                            "lower replicas or tp, or add nodes")
    preferred = [p for p in fitting if prefer_domain and p.domain == prefer_domain]
    pool = preferred[0] if preferred else min(fitting, key=lambda p: _pairing_key(p.roles, role, p.order))
    return _take(pool, role, index, tp)


def _take(pool: GpuPool, role: str, index: int, tp: int) -> WorkerPlacement:
    shards = pool.take(tp)
    pool.roles[role] += 1
    (node, gpus), extra = shards[0], tuple(shards[1:])
    return WorkerPlacement(worker_id(role, index), role, node, gpus, pool.domain, None, extra)


def _place_cpu(topology: Topology, recipe: Recipe, requests: list[tuple[WorkerGroup, int]],
               used: Placement) -> list[WorkerPlacement]:
    for group, _ in requests:
        if group.tp > 1:
            raise _recipe_error(recipe, f"workers.{group.role}.tp",
                                f"tp={group.tp} needs GPUs, but workers run on CPU "
                                f"(topology '{topology.name}' has {topology.num_gpus} GPUs, "
                                f"model.device is {recipe.model.device})", "use tp: 1 on CPU")
    nodes = [n for n in topology.nodes if n.is_cpu_only] or list(topology.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    roles: dict[str, Counter] = {n.name: Counter() for n in nodes}
    for w in used.workers:
        if w.node in roles:
            roles[w.node][w.role] += 1
    chosen: list[tuple[WorkerGroup, int, str]] = []
    for group, index in _interleave(requests):
        node = min(roles, key=lambda n: _pairing_key(roles[n], group.role, order[n]))
        roles[node][group.role] += 1
        chosen.append((group, index, node))
    out = []
    for group, index, node_name in chosen:
        threads = group.cpu_threads or _thread_share(topology.node(node_name), sum(roles[node_name].values()))
        out.append(WorkerPlacement(worker_id(group.role, index), group.role, node_name, (), None, threads))
    return out


def _check_gpu_totals(topology: Topology, recipe: Recipe) -> None:
    pools = build_pools(topology)
    widest = max(pools, key=lambda p: p.capacity)
    for group in recipe.workers:
        if group.replicas and group.tp > widest.capacity:
            kind = "NVLink domain" if widest.domain else "node"
            raise _recipe_error(recipe, f"workers.{group.role}.tp",
                                f"tp={group.tp} does not fit: the largest {kind} in topology "
                                f"'{topology.name}' holds {widest.capacity} GPUs and a tensor-parallel "
                                f"group never spans NVLink domains", f"use tp <= {widest.capacity}")
    need = sum(g.replicas * g.tp for g in recipe.workers)
    if need > topology.num_gpus:
        parts = " + ".join(f"{g.role} {g.replicas} x tp{g.tp}" for g in recipe.workers if g.replicas)
        raise _recipe_error(recipe, "workers",
                            f"needs {need} GPUs ({parts}) but topology '{topology.name}' has "
                            f"{topology.num_gpus}: {need - topology.num_gpus} short",
                            "lower replicas or tp, or use a bigger topology", shortfall=need - topology.num_gpus)


def _unit_pools(topology: Topology, recipe: Recipe,
                pools: list[GpuPool]) -> dict[tuple[str, int], list[GpuPool]]:
    """(role, worker index) -> the pools it must go to, for per-domain / per-rack groups:
    indices run unit by unit (domain 0 gets 0..n-1, domain 1 gets n..2n-1, ...)."""
    out: dict[tuple[str, int], list[GpuPool]] = {}
    rack_of = {n.name: n.rack for n in topology.nodes}
    by_rack: dict[str, list[GpuPool]] = {}
    for pool in pools:
        by_rack.setdefault(rack_of[next(iter(pool.size))], []).append(pool)
    for group in recipe.workers:
        if group.replicas_per_domain is not None:
            units = [[p] for p in pools]
            per = group.replicas_per_domain
        elif group.replicas_per_rack is not None:
            units = [by_rack.get(r.name, []) for r in topology.racks]
            per = group.replicas_per_rack
        else:
            continue
        for u, unit in enumerate(units):
            for k in range(per):
                out[(group.role, u * per + k)] = unit
    return out


def _on_cpu(topology: Topology, recipe: Recipe) -> bool:
    device = recipe.model.device
    if device == "cpu":
        return True
    if topology.num_gpus == 0:
        if device == "cuda" or recipe.model.engine == "trtllm":
            what = "model.device is cuda" if device == "cuda" else "engine trtllm needs GPUs"
            raise _recipe_error(recipe, "model.device" if device == "cuda" else "model.engine",
                                f"{what}, but topology '{topology.name}' has no GPUs",
                                "use a GPU topology, or engine torch/mock with device cpu or auto")
        return True
    return False


def _gpu_order(requests: list[tuple[WorkerGroup, int]]) -> list[tuple[WorkerGroup, int]]:
    """Widest groups first; within a width, roles interleaved in proportion."""
    interleaved = _interleave(requests)
    return sorted(interleaved, key=lambda r: -r[0].tp)  # sorted() is stable


def _interleave(requests: list[tuple[WorkerGroup, int]]) -> list[tuple[WorkerGroup, int]]:
    counts = Counter(g.role for g, _ in requests)
    return sorted(requests, key=lambda r: (r[1] / counts[r[0].role], ROLE_ORDER.index(r[0].role)))


def _pairing_key(roles: Counter, role: str, order: int) -> tuple[int, int, int]:
    others = sum(v for r, v in roles.items() if r != role)
    return roles[role], -others, order


def _thread_share(node: Node, num_workers: int) -> int | None:
    cores = node.cpus
    if cores is None and node.ssh.is_local:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // max(1, num_workers)) if cores else None


def _pool_of_node(pools: list[GpuPool], node: str) -> GpuPool | None:
    return next((p for p in pools if p.domain is None and node in p.size), None)


def _recipe_error(recipe: Recipe, field: str, message: str, hint: str, shortfall: int | None = None) -> FitError:
    return FitError(f"{message} ({hint})", path=recipe.source, line=recipe.line_of(field), field=field,
                    shortfall_gpus=shortfall)
