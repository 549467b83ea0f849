"""Topology format details: defaults, explicit domains, local nodes, head."""

from __future__ import annotations

import pytest

from dyn.config.loader import parse_topology
from dyn.errors import ConfigError

GPU_DEFAULTS = "defaults: {gpus: 4, gpu_model: GB200, gpu_memory_gib: 186, user: ops, port: 2222}\n"


def test_defaults_fill_entries_and_entries_override() -> None:
    topo = parse_topology("name: t\nhead: a1\n" + GPU_DEFAULTS + "racks:\n  - name: r\n    nodes:\n"
                          "      - {name: 'a{1..2}', address: '10.1.0.{1..2}'}\n"
                          "      - {name: b, address: 10.1.0.9, gpus: [2, 3], port: 22, cpus: 16}\n", "t.yaml")
    a1, a2, b = topo.nodes
    assert (a1.ssh.user, a1.ssh.port, len(a1.gpus)) == ("ops", 2222, 4)
    assert [g.index for g in b.gpus] == [2, 3] and b.ssh.port == 22 and b.cpus == 16
    assert a2.rack == "r" and topo.racks[0].node_names == ("a1", "a2", "b")
    assert [d.name for d in topo.nvlink_domains] == ["nvl-a1", "nvl-a2", "nvl-b"]  # per-node by default


def test_port_ranges_give_one_sshd_per_node_on_loopback() -> None:
    topo = parse_topology("name: t\nhead: n1\nracks:\n  - name: r\n    nodes:\n"
                          "      - {name: 'n{1..3}', address: 127.0.0.1, port: '{2201..2203}'}\n", "t.yaml")
    assert [n.ssh.port for n in topo.nodes] == [2201, 2202, 2203]


def test_explicit_domains_can_split_a_rack() -> None:
    topo = parse_topology("name: t\nhead: n01\n" + GPU_DEFAULTS + "racks:\n  - name: r\n    nodes:\n"
                          "      - {name: 'n{01..04}', address: 'h{1..4}'}\n"
                          "nvlink_domains:\n  - {name: left, nodes: ['n{01..02}']}\n"
                          "  - {name: right, nodes: [n03]}\n", "t.yaml")
    assert [d.num_gpus for d in topo.nvlink_domains] == [8, 4]
    assert topo.domain_of("n04", 0) is None and topo.domain_of("n02", 3) == "left"


def test_node_in_two_domains_is_rejected() -> None:
    text = ("name: t\nhead: n1\n" + GPU_DEFAULTS + "racks:\n  - name: r\n    nodes:\n"
            "      - {name: 'n{1..2}', address: 'h{1..2}'}\n"
            "nvlink_domains:\n  - {name: a, nodes: [n1]}\n  - {name: b, nodes: [n1, n2]}\n")
    with pytest.raises(ConfigError, match="already in domain 'a'") as info:
        parse_topology(text, "t.yaml")
    assert info.value.line == 10 and info.value.path == "t.yaml"


def test_several_local_nodes_need_distinct_bind_addresses() -> None:
    ok = parse_topology("name: t\nhead: l1\nracks:\n  - name: r\n    nodes:\n"
                        "      - {name: 'l{1..2}', address: local, bind_address: '127.0.0.{1..2}'}\n", "t.yaml")
    assert [n.bind_address for n in ok.nodes] == ["127.0.0.1", "127.0.0.2"]
    with pytest.raises(ConfigError, match="same bind_address"):
        parse_topology("name: t\nhead: l1\nracks:\n  - name: r\n    nodes:\n"
                       "      - {name: 'l{1..2}', address: local}\n", "t.yaml")


def test_single_node_is_its_own_head() -> None:
    topo = parse_topology("name: t\nracks:\n  - name: r\n    nodes: [{name: only, address: local}]\n", "t.yaml")
    assert topo.head == "only"


def test_inherited_bad_value_points_at_defaults() -> None:
    text = "name: t\nhead: n1\ndefaults:\n  port: 0\nracks:\n  - name: r\n    nodes: [{name: n1, address: h}]\n"
    with pytest.raises(ConfigError) as info:
        parse_topology(text, "t.yaml")
    assert info.value.line == 4 and info.value.field == "defaults.port"


def test_per_rack_mode_can_be_set_per_rack() -> None:
    topo = parse_topology("name: t\nhead: a1\n" + GPU_DEFAULTS + "racks:\n"
                          "  - {name: ra, nvlink: per-rack, nodes: [{name: 'a{1..2}', address: 'ha{1..2}'}]}\n"
                          "  - {name: rb, nodes: [{name: 'b{1..2}', address: 'hb{1..2}'}]}\n", "t.yaml")
    assert [(d.name, d.num_gpus) for d in topo.nvlink_domains] == [("nvl-ra", 8), ("nvl-b1", 4), ("nvl-b2", 4)]
