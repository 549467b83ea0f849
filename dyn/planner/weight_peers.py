"""Which live workers a starting worker may stream its weights from, best path first.

A peer qualifies when it is ready, says (heartbeat info `weights`) that it
serves the same weights key (model, dtype, TP shard) and has a weight
server address. Order: the shuttle's path choice between the two workers
(cuda_ipc, shm, nixl, tcp), then the least busy. `ahead` lists workers with
the same tensor-parallel width still starting before the asker (by id), so a
`weights.source: peer` worker can wait for one of them instead of reading
the disk in parallel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dyn.errors import DynError

if TYPE_CHECKING:
    from dyn.config.recipe import Recipe
    from dyn.config.topology import Topology
    from dyn.planner.health import ProcessSlot

PATH_RANK = {"cuda_ipc": 0, "shm": 1, "nixl": 2, "tcp": 3}
STARTING_STATES = ("pending", "launching", "starting", "loading")


def weight_peers(slots: "list[ProcessSlot]", asker_id: str, key: str, topology: "Topology",
                 recipe: "Recipe", *, nixl_available: bool) -> dict[str, Any]:
    """{"peers": [{process_id, node, address, transport, reason}], "ahead": [ids]}."""
    from dyn.shuttle.path import Endpoint, choose_path

    by_id = {s.id: s for s in slots}
    asker = by_id.get(asker_id)
    if asker is None:
        return {"peers": [], "ahead": [], "error": f"unknown process {asker_id!r}"}
    dst = Endpoint(asker.node, tuple(asker.gpus))
    ranked = []
    for slot in slots:
        info = slot.info.get("weights") if isinstance(slot.info, dict) else None
        if slot.id == asker_id or slot.state != "ready" or not isinstance(info, dict):
            continue
        if info.get("key") != key or not info.get("address"):
            continue
        try:
            path = choose_path(topology, Endpoint(slot.node, tuple(slot.gpus)), dst, recipe.shuttle.transport,
                               cuda_available=recipe.model.device == "cuda", nixl_available=nixl_available)
        except DynError:
            continue  # a forced transport that cannot join these two: not a peer
        busy = slot.metrics.get("in_flight", 0.0) + slot.metrics.get("num_running", 0.0)
        ranked.append((PATH_RANK.get(path.transport, 9), busy, slot.id,
                       {"process_id": slot.id, "node": slot.node, "address": str(info["address"]),
                        "transport": path.transport, "reason": path.reason}))
    ranked.sort(key=lambda r: r[:3])
    tp = _tp_of(recipe, asker.role)
    ahead = sorted(s.id for s in slots if s.id < asker_id and s.role != "frontend"
                   and s.state in STARTING_STATES and _tp_of(recipe, s.role) == tp)
    return {"peers": [r[3] for r in ranked], "ahead": ahead}


def _tp_of(recipe: "Recipe", role: str) -> int:
    group = recipe.group(role) if role in ("prefill", "decode", "both") else None  # type: ignore[arg-type]
    return group.tp if group is not None else 1
