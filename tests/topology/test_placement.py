"""Placement on the shipped racks and on small hand-made topologies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dyn.config.loader import load_recipe, load_topology, parse_recipe, parse_topology
from dyn.topology.placement import FitError, Placement, place, place_one

ROOT = Path(__file__).resolve().parents[2]


def _files(topology: str, recipe: str):
    return load_topology(ROOT / f"topologies/{topology}.yaml"), load_recipe(ROOT / f"recipes/{recipe}.yaml")


def _assert_sound(topology, placement: Placement) -> None:
    keys = [k for w in placement.workers for k in w.gpu_keys]
    assert len(keys) == len(set(keys)), "a GPU is used twice"
    for w in placement.workers:
        assert {topology.domain_of(node, idx) for node, idx in w.gpu_keys} <= {w.nvlink_domain}


def test_llama_70b_fills_the_nvl72_rack_without_double_booking() -> None:
    topo, recipe = _files("gb200-nvl72", "llama-3.1-70b-nvl72")
    placement = place(topo, recipe)
    _assert_sound(topo, placement)
    assert [w.id for w in placement.workers[:2]] == ["prefill-0", "prefill-1"]
    assert Counter(w.role for w in placement.workers) == {"prefill": 8, "decode": 12}
    assert len(placement.used_gpus()) == 64 and placement.head == "tray01"
    decodes = placement.of_role("decode")
    assert all(len(w.gpus) == 4 and not w.extra_nodes for w in decodes)  # one whole tray each
    assert len({w.node for w in decodes}) == 12


def test_deepseek_tp16_spans_four_trays_inside_the_domain() -> None:
    topo, recipe = _files("gb200-nvl72", "deepseek-r1-nvl72")
    placement = place(topo, recipe)
    _assert_sound(topo, placement)
    decode = placement.worker("decode-0")
    assert decode.num_gpus == 16 and len(decode.shards) == 4
    assert len(placement.used_gpus()) == 72


def test_every_nvl72_rack_of_four_holds_both_roles() -> None:
    topo, recipe = _files("gb200-nvl72x4", "llama-3.1-70b-nvl72")
    placement = place(topo, recipe)
    _assert_sound(topo, placement)
    roles = {d.name: {w.role for w in placement.workers if w.nvlink_domain == d.name} for d in topo.nvlink_domains}
    assert all(r == {"prefill", "decode"} for r in roles.values()), roles


def test_hgx_pairs_prefill_and_decode_in_each_server() -> None:
    topo, recipe = _files("hgx-h100x8", "llama-3.1-8b-hgx")
    placement = place(topo, recipe)
    _assert_sound(topo, placement)
    per_node = Counter((w.node, w.role) for w in placement.workers)
    assert per_node == {("hgx01", "prefill"): 2, ("hgx02", "prefill"): 2,
                        ("hgx01", "decode"): 4, ("hgx02", "decode"): 4}


def test_placement_is_deterministic() -> None:
    topo, recipe = _files("gb200-nvl72x4", "llama-3.1-70b-nvl72")
    assert place(topo, recipe) == place(*_files("gb200-nvl72x4", "llama-3.1-70b-nvl72"))


def test_cpu_workers_share_the_node_cores() -> None:
    topo = parse_topology("name: t\nracks:\n  - name: r\n    nodes: [{name: box, address: local, cpus: 8}]\n", "t")
    _, recipe = _files("local", "mock-local")
    placement = place(topo, recipe)
    assert [(w.id, w.node, w.gpus, w.cpu_threads) for w in placement.workers] == [
        ("prefill-0", "box", (), 2), ("prefill-1", "box", (), 2), ("decode-0", "box", (), 2), ("decode-1", "box", (), 2)]


def test_cpu_workers_pair_up_per_node() -> None:
    topo = parse_topology("name: t\nhead: c1\nracks:\n  - name: r\n    nodes:\n"
                          "      - {name: 'c{1..2}', address: local, bind_address: '127.0.0.{1..2}', cpus: 4}\n", "t")
    _, recipe = _files("local", "mock-local")
    placement = place(topo, recipe)
    assert {w.node: [] for w in placement.workers}.keys() == {"c1", "c2"}
    assert {(w.node, w.role) for w in placement.workers} == {("c1", "prefill"), ("c1", "decode"),
                                                             ("c2", "prefill"), ("c2", "decode")}
    assert all(w.cpu_threads == 2 for w in placement.workers)


def test_explicit_cpu_threads_win() -> None:
    topo = parse_topology("name: t\nracks:\n  - name: r\n    nodes: [{name: box, address: local, cpus: 8}]\n", "t")
    recipe = parse_recipe("name: m\nmodel: {engine: mock}\nworkers: {both: {replicas: 2, cpu_threads: 3}}\n", "m")
    assert [w.cpu_threads for w in place(topo, recipe).workers] == [3, 3]


def test_place_one_adds_next_to_running_workers() -> None:
    topo, recipe = _files("gb200-nvl72x4", "llama-3.1-70b-nvl72")
    placement = place(topo, recipe)
    extra = place_one(topo, recipe, "decode", placement, prefer_domain="nvl-nvl72-c")
    assert extra.id == f"decode-{len(placement.of_role('decode'))}" and extra.nvlink_domain == "nvl-nvl72-c"
    assert not set(extra.gpu_keys) & placement.used_gpus()
    plain = place_one(topo, recipe, "prefill", placement)
    assert plain.id == "prefill-32" and len(plain.gpus) == 2  # 8 per rack x 4 racks are running


def test_place_one_when_full_says_what_is_free() -> None:
    topo, recipe = _files("gb200-nvl72", "deepseek-r1-nvl72")
    placement = place(topo, recipe)
    with pytest.raises(FitError, match="no room for decode-3 .tp=16.*free GPUs: nvl-nvl72-a: 0"):
        place_one(topo, recipe, "decode", placement)


def test_without_nvlink_tp_stays_on_one_node() -> None:
    topo = parse_topology("name: t\nhead: n1\nnvlink: none\ndefaults: {gpus: 4, gpu_model: L40S, gpu_memory_gib: 48}\n"
                          "racks:\n  - name: r\n    nodes: [{name: 'n{1..2}', address: 'h{1..2}'}]\n", "t")
    ok = parse_recipe("name: m\nmodel: {path: /m}\nworkers: {both: {replicas: 2, tp: 4}}\n", "m")
    placement = place(topo, ok)
    assert [(w.node, w.gpus, w.nvlink_domain) for w in placement.workers] == [
        ("n1", (0, 1, 2, 3), None), ("n2", (0, 1, 2, 3), None)]
    wide = parse_recipe("name: m\nmodel: {path: /m}\nworkers:\n  both: {tp: 8}\n", "m.yaml")
    with pytest.raises(FitError, match="largest node .* holds 4 GPUs") as info:
        place(topo, wide)
    assert info.value.line == 4 and info.value.path == "m.yaml"


def test_fragmentation_is_reported_with_free_gpus() -> None:
    topo = parse_topology("name: t\nhead: n1\ndefaults: {gpus: 4, gpu_model: H100, gpu_memory_gib: 80}\n"
                          "racks:\n  - name: r\n    nodes: [{name: 'n{1..2}', address: 'h{1..2}'}]\n", "t")
    recipe = parse_recipe("name: m\nmodel: {path: /m}\nmode: disaggregated\nworkers:\n"
                          "  prefill: {replicas: 2, tp: 3}\n  decode: {replicas: 1, tp: 2}\n", "m.yaml")
    with pytest.raises(FitError, match=r"no room for decode-0 \(tp=2\).*nvl-n1: 1, nvl-n2: 1"):
        place(topo, recipe)


def test_gpu_recipe_on_cpu_topology_is_refused() -> None:
    topo, _ = _files("local", "tiny-local")
    _, recipe = _files("hgx-h100x8", "llama-3.1-8b-hgx")
    with pytest.raises(FitError, match="model.device is cuda, but topology 'local' has no GPUs"):
        place(topo, recipe)


def test_to_dict_has_the_documented_keys() -> None:
    topo, recipe = _files("gb200-nvl72", "llama-3.1-70b-nvl72")
    data = place(topo, recipe).to_dict()
    assert data["head"] == "tray01"
    assert set(data["workers"][0]) >= {"id", "role", "node", "gpus", "nvlink_domain", "cpu_threads"}
