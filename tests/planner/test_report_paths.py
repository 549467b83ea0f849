"""`dyn status` shuttle paths: per prefill->decode pair, the transport the decode worker will use."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyn.cli.status import planner_lines
from dyn.config.loader import load_topology, parse_recipe
from dyn.planner.health import ProcessSlot
from dyn.planner.report import shuttle_paths, slot_status
from dyn.shuttle.transports import nixl

ROOT = Path(__file__).resolve().parents[2]
RECIPE = parse_recipe("name: r\nmodel: {engine: torch, path: /models/m}\nmode: disaggregated\n"
                      "workers: {prefill: {replicas: 1}, decode: {replicas: 2}}\n", "r.yaml")


def _slots() -> list[ProcessSlot]:
    return [ProcessSlot("prefill-0", "prefill", "a-tray01", (0,)),
            ProcessSlot("decode-0", "decode", "a-tray05", (0,)),
            ProcessSlot("decode-1", "decode", "b-tray01", (0,))]


def test_status_shows_each_pairs_transport_and_hop(monkeypatch):
    monkeypatch.setattr(nixl, "is_available", lambda: True)
    paths = shuttle_paths(load_topology(ROOT / "topologies/gb200-nvl72x4.yaml"), RECIPE, _slots())
    pairs = {(p["prefill"], p["decode"]): (p["transport"], p["hop"], p["link"]) for p in paths["pairs"]}
    assert pairs == {("prefill-0", "decode-0"): ("nixl", "nvlink_domain", "nvlink"),
                     ("prefill-0", "decode-1"): ("nixl", "cross_domain", "network")}
    lines = planner_lines({"shuttle_paths": paths})
    assert any("prefill-0 -> decode-0: nixl over nvlink, nvlink_domain" in line for line in lines)


def test_status_names_a_pair_that_would_cross_an_nvlink_domain_over_tcp(monkeypatch):
    monkeypatch.setattr(nixl, "is_available", lambda: False)
    paths = shuttle_paths(load_topology(ROOT / "topologies/gb200-nvl72x4.yaml"), RECIPE, _slots())
    assert paths["by_transport"] == {"none": 1, "tcp": 1}
    assert "install nixl-cu12" in paths["error"]
    assert any(line.startswith("  error:") for line in planner_lines({"shuttle_paths": paths}))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_workers_on_one_node_use_shm(device):
    recipe = parse_recipe(f"name: r\nmodel: {{engine: mock, device: {device}}}\nmode: disaggregated\n"
                          "workers: {prefill: {}, decode: {}}\n", "r.yaml")
    slots = [ProcessSlot("prefill-0", "prefill", "local", ()), ProcessSlot("decode-0", "decode", "local", ())]
    paths = shuttle_paths(load_topology(ROOT / "topologies/local.yaml"), recipe, slots)
    assert paths["pairs"][0]["transport"] == "shm" and paths["pairs"][0]["hop"] == "same_node"


def test_mock_workers_on_gpus_are_shown_moving_host_memory_as_they_do():
    """The mock keeps its KV in host memory wherever it is placed (Backend.kv_on_cuda): status
    shows the shm / host-network paths its workers really take, not CUDA IPC."""
    recipe = parse_recipe("name: r\nmodel: {engine: mock}\nmode: disaggregated\n"
                          "workers: {prefill: {replicas: 1}, decode: {replicas: 2}}\n", "r.yaml")
    slots = [ProcessSlot("prefill-0", "prefill", "a-tray01", (0,)),
             ProcessSlot("decode-0", "decode", "a-tray01", (1,)),
             ProcessSlot("decode-1", "decode", "a-tray02", (0,))]
    paths = shuttle_paths(load_topology(ROOT / "topologies/gb200-nvl72x4.yaml"), recipe, slots)
    pairs = {(p["prefill"], p["decode"]): p["transport"] for p in paths["pairs"]}
    assert pairs[("prefill-0", "decode-0")] == "shm"
    assert pairs[("prefill-0", "decode-1")] in ("nixl", "tcp")


def test_status_shows_the_port_a_frontend_took_when_the_recipe_asked_for_any():
    from dyn.planner.report import status_payload

    front = ProcessSlot("frontend", "frontend", "local", ())
    front.addresses = {"http": "http://127.0.0.1:41234"}
    payload = status_payload(name="d", phase="running", started_at=0.0, wall_now=1.0, now=1.0,
                             frontend_url="http://127.0.0.1:0", config_hash="h", slots=[front], events=[],
                             daemon={}, error=None)
    assert payload["frontend_url"] == "http://127.0.0.1:41234"


def test_status_shows_what_each_decode_worker_really_pulled_by_transport(monkeypatch):
    monkeypatch.setattr(nixl, "is_available", lambda: False)
    slots = _slots()
    slots[1].metrics.update({"kv_pulls": 3.0, "kv_pull_failures": 1.0, "kv_local_fallbacks": 1.0,
                             "shuttle_bytes.tcp": 3 * 2.0**20, "shuttle_gbps.tcp": 1.5})
    slots[2].metrics.update({"requests_total": 4.0})  # heard nothing about pulls yet: no block
    workers = [slot_status(s, 0.0) for s in slots]
    assert workers[1]["shuttle"] == {"pulls": 3.0, "pull_failures": 1.0, "local_fallbacks": 1.0,
                                     "bytes_by_transport": {"tcp": 3 * 2.0**20}}
    assert "shuttle" not in workers[2]
    paths = shuttle_paths(load_topology(ROOT / "topologies/gb200-nvl72x4.yaml"), RECIPE, slots)
    lines = planner_lines({"shuttle_paths": paths, "workers": workers})
    assert "  decode-0 pulled: tcp 3.0 MiB (3 pulls, 1 failed, 1 prefilled locally)" in lines
    assert not any("decode-1 pulled" in line for line in lines)


def test_a_vllm_decode_worker_shows_the_bytes_its_connector_moved():
    """vLLM's NixlConnector moves a vLLM pair's KV: dyn's shuttle counts no bytes, the connector
    does (its transfers failed or timed out are the pair's failed pulls)."""
    recipe = parse_recipe("name: r\nmodel: {engine: vllm, path: /models/m}\nmode: disaggregated\n"
                          "workers: {prefill: {replicas: 1}, decode: {replicas: 1}}\n")
    slots = _slots()
    slots[1].metrics.update({"kv_pulls": 2.0, "kv_local_fallbacks": 0.0, "kv_connector.bytes_transferred": 8847360.0,
                             "kv_connector.failed_transfers": 1.0, "kv_connector.pull_timeouts": 1.0})
    workers = [slot_status(s, 0.0) for s in slots]
    assert workers[1]["shuttle"]["bytes_by_transport"] == {"vllm-nixl": 8847360.0}
    lines = planner_lines({"shuttle_paths": shuttle_paths(load_topology(ROOT / "topologies/gb200-nvl72x4.yaml"),
                                                          recipe, slots), "workers": workers})
    assert "  decode-0 pulled: vllm-nixl 8.4 MiB (2 pulls, 2 failed, 0 prefilled locally)" in lines
