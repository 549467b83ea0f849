"""Plain-data views of a topology for `dyn topo validate --json` and dashboards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from dyn.config.topology import Topology


def summarize(topology: Topology) -> dict[str, Any]:
    """Counts plus per-domain membership; JSON-ready."""
    models = Counter(g.model for n in topology.nodes for g in n.gpus)
    return {
        "name": topology.name,
        "source": topology.source,
        "head": topology.head,
        "racks": len(topology.racks),
        "nodes": len(topology.nodes),
        "gpus": topology.num_gpus,
        "nvlink_domains": len(topology.nvlink_domains),
        "gpu_models": dict(sorted(models.items())),
        "cpu_only_nodes": sum(1 for n in topology.nodes if n.is_cpu_only),
        "domains": [{"name": d.name, "gpus": d.num_gpus, "nodes": domain_nodes(topology, d.name)}
                    for d in topology.nvlink_domains],
    }


def domain_nodes(topology: Topology, domain: str) -> list[str]:
    """Nodes with at least one GPU in `domain`, in topology order."""
    for d in topology.nvlink_domains:
        if d.name == domain:
            return list(dict.fromkeys(node for node, _ in d.members))
    raise KeyError(domain)
