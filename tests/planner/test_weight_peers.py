"""The daemon's answer to a starting worker: ready peers with its weights, best path first."""

from __future__ import annotations

from dyn.config.loader import parse_recipe, parse_topology
from dyn.planner.health import ProcessSlot
from dyn.planner.weight_peers import weight_peers

TOPOLOGY = """\
name: two
head: a
racks:
  - name: r
    nodes:
      - {name: a, address: local, bind_address: 127.0.0.1}
      - {name: b, address: local, bind_address: 127.0.0.2}
"""
RECIPE = ("name: w\nmodel: {path: /m, device: cpu}\nmode: disaggregated\n"
          "workers: {prefill: {replicas: 1}, decode: {replicas: 3, tp: 2}}\n")


def _slot(pid: str, role: str, node: str, state: str, key: str | None = "K", busy: float = 0.0) -> ProcessSlot:
    info = {"weights": {"key": key, "address": f"tcp://{node}:1"}} if key else {}
    return ProcessSlot(pid, role, node, (), state=state, info=info, metrics={"in_flight": busy})


def test_ready_peers_with_the_same_key_same_host_first_then_least_busy():
    slots = [_slot("decode-0", "decode", "b", "ready"),
             _slot("decode-1", "decode", "a", "ready", busy=3),
             _slot("decode-2", "decode", "a", "ready", busy=1),
             _slot("prefill-0", "prefill", "a", "ready", key="other"),  # other weights
             _slot("decode-3", "decode", "a", "loading"),               # not ready
             _slot("decode-4", "decode", "a", "starting", key=None)]    # the asker
    out = weight_peers(slots, "decode-4", "K", parse_topology(TOPOLOGY), parse_recipe(RECIPE),
                       nixl_available=False)
    assert [(p["process_id"], p["transport"]) for p in out["peers"]] == [
        ("decode-2", "shm"), ("decode-1", "shm"), ("decode-0", "tcp")]
    assert out["ahead"] == ["decode-3"]


def test_no_peer_for_an_unknown_asker_or_a_forced_path_that_cannot_join_them():
    topology, recipe = parse_topology(TOPOLOGY), parse_recipe(RECIPE + "shuttle: {transport: shm}\n")
    slots = [_slot("decode-0", "decode", "b", "ready"), _slot("decode-1", "decode", "a", "loading", key=None)]
    assert weight_peers(slots, "decode-1", "K", topology, recipe, nixl_available=False)["peers"] == []
    assert "unknown process" in weight_peers(slots, "nobody", "K", topology, recipe, nixl_available=False)["error"]
