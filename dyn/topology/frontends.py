"""Where the frontend replicas run: `frontend.replicas` dealt round-robin over `frontend.nodes`.

Replica 0 keeps the id "frontend" (one-frontend deployments look as they always did);
the others are "frontend-1", "frontend-2", ... A replica on the head node listens on the
recipe's `frontend.host`; one elsewhere listens on its node's bind address, same port.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyn.config.recipe import Recipe
from dyn.config.topology import Topology
from dyn.topology.placement import FitError


@dataclass(frozen=True)
class FrontendPlacement:
    id: str
    node: str
    host: str
    """Address its HTTP API listens on."""
    shares_port: bool
    """Another replica listens on the same node and port (SO_REUSEPORT)."""


def frontend_id(index: int) -> str:
    return "frontend" if index == 0 else f"frontend-{index}"


def place_frontends(topology: Topology, recipe: Recipe) -> list[FrontendPlacement]:
    """One placement per replica; a node name the topology lacks is a FitError naming the line."""
    spec = recipe.frontend
    nodes = spec.nodes or (topology.head,)
    known = {n.name for n in topology.nodes}
    for i, name in enumerate(nodes):
        if name not in known:
            raise FitError(f"frontend.nodes[{i}]: topology {topology.name!r} has no node {name!r}",
                           path=recipe.source, line=recipe.line_of("frontend.nodes"), field="frontend.nodes")
    placed = [nodes[i % len(nodes)] for i in range(spec.replicas)]
    out = []
    for i, node in enumerate(placed):
        host = spec.host if node == topology.head else topology.node(node).bind_address
        out.append(FrontendPlacement(frontend_id(i), node, host, placed.count(node) > 1))
    return out


def frontend_urls(topology: Topology, recipe: Recipe) -> list[str]:
    """The distinct public URLs of a deployment's frontends (one per node that runs any)."""
    urls: list[str] = []
    for p in place_frontends(topology, recipe):
        url = f"http://{p.host}:{recipe.frontend.port}"
        if url not in urls:
            urls.append(url)
    return urls
