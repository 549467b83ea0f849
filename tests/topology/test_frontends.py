"""Frontend replicas: ids, nodes (round-robin over frontend.nodes), listen host, port sharing."""

from __future__ import annotations

import pytest

from dyn.config.loader import parse_recipe, parse_topology
from dyn.errors import ConfigError
from dyn.topology.frontends import frontend_urls, place_frontends
from dyn.topology.placement import FitError

TOPOLOGY = """name: two
head: a
racks:
  - name: r
    nodes:
      - {name: a, address: local, bind_address: 127.0.0.1, gpus: 0}
      - {name: b, address: 10.0.0.2, bind_address: 10.0.0.2, gpus: 0}
"""


def _recipe(frontend: str):
    return parse_recipe(f"name: m\nmodel: {{engine: mock}}\nworkers: {{both: {{}}}}\nfrontend: {frontend}\n", "m.yaml")


def test_replicas_default_to_the_head_and_share_its_port():
    topo = parse_topology(TOPOLOGY, "t.yaml")
    placed = place_frontends(topo, _recipe("{replicas: 3, port: 9000}"))
    assert [(p.id, p.node, p.host, p.shares_port) for p in placed] == [
        ("frontend", "a", "127.0.0.1", True), ("frontend-1", "a", "127.0.0.1", True),
        ("frontend-2", "a", "127.0.0.1", True)]
    one = place_frontends(topo, _recipe("{port: 9000}"))
    assert [(p.id, p.shares_port) for p in one] == [("frontend", False)]  # never SO_REUSEPORT alone


def test_replicas_are_dealt_over_frontend_nodes_and_listed_per_node():
    topo = parse_topology(TOPOLOGY, "t.yaml")
    recipe = _recipe("{replicas: 3, port: 9000, nodes: [a, b]}")
    placed = place_frontends(topo, recipe)
    assert [(p.node, p.host, p.shares_port) for p in placed] == [
        ("a", "127.0.0.1", True), ("b", "10.0.0.2", False), ("a", "127.0.0.1", True)]
    assert frontend_urls(topo, recipe) == ["http://127.0.0.1:9000", "http://10.0.0.2:9000"]


def test_bad_frontend_replicas_and_nodes_are_located_errors():
    topo = parse_topology(TOPOLOGY, "t.yaml")
    with pytest.raises(FitError, match=r"frontend.nodes\[1\].*no node 'c'"):
        place_frontends(topo, _recipe("{nodes: [a, c]}"))
    with pytest.raises(ConfigError, match="m.yaml:4.*frontend.replicas"):
        _recipe("{replicas: 0}")
    with pytest.raises(ConfigError, match="frontend.nodes.*twice"):
        _recipe("{nodes: [a, a]}")
