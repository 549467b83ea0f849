"""Scaler: where a new worker goes, its keys before its launch, and the drain -> stop order.

A recording fake stands in for the fleet's I/O (launch, kill, pid probes);
placement, ids, keys and the order of control commands are the real thing.
The live versions run in tests/e2e/test_planner_live.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dyn.config.loader import load_topology, parse_recipe
from dyn.control.keys import DeploymentKeys
from dyn.planner.adoption import worker_slots
from dyn.planner.health import ProcessSlot
from dyn.planner.policy import ScalingAction
from dyn.planner.state import ProcessRecord, Snapshot
from dyn.topology.placement import place
from scaler_fakes import recording_scaler

ROOT = Path(__file__).resolve().parents[2]
RECIPE = parse_recipe("""name: s
model: {engine: mock}
mode: disaggregated
workers:
  prefill: {replicas: 1}
  decode: {replicas: 2}
""", "s.yaml")


class FakeNodes:
    def __init__(self) -> None:
        self.running: set[int] = set()

    async def alive(self, node: str, pids: list[int]) -> set[int]:
        return {p for p in pids if p in self.running}


class FakeFleet:
    def __init__(self, slots: list[ProcessSlot]) -> None:
        self.slots = {s.id: s for s in slots}
        self.events: list[str] = []
        self.nodes = FakeNodes()
        self.launched: list[str] = []
        self.secrets_removed: list[str] = []

    def note(self, text: str) -> None:
        self.events.append(text)

    def add(self, slot: ProcessSlot, **budget) -> None:
        self.slots[slot.id] = slot

    async def launch(self, slot: ProcessSlot) -> None:
        self.launched.append(slot.id)
        slot.pid = 4242
        slot.set_state("starting", time.monotonic())

    async def kill(self, slot: ProcessSlot, sig: int) -> None:
        self.nodes.running.discard(slot.pid)

    async def remove_secrets(self, slots) -> None:
        self.secrets_removed += [s.id for s in slots]


def _slot(wid: str, role: str, node: str, gpu: int, state: str = "ready", pid: int | None = None) -> ProcessSlot:
    slot = ProcessSlot(wid, role, node, (gpu,), state=state, pid=pid, registered=state == "ready")
    return slot


def _scaler(fleet: FakeFleet, tmp_path: Path, keys: DeploymentKeys | None = None, **deadlines):
    return recording_scaler(fleet, tmp_path, RECIPE, keys, **deadlines)


def test_new_worker_pairs_in_its_partners_domain_with_a_fresh_id(tmp_path):
    # decode-1 was flipped to prefill: its id keeps the old name, so the next decode is decode-2
    fleet = FakeFleet([_slot("prefill-0", "prefill", "hgx02", 0), _slot("decode-0", "decode", "hgx02", 1),
                       _slot("decode-1", "prefill", "hgx02", 2), _slot("frontend", "frontend", "hgx01", 0)])
    fleet.slots["frontend"].gpus = ()
    scaler, _, _ = _scaler(fleet, tmp_path)
    wp = scaler.place("decode")
    assert wp.id == "decode-2"
    assert wp.node == "hgx02" and wp.gpus[0] not in (0, 1, 2)  # next to the prefill workers, a free GPU
    assert scaler.place("prefill").id == "prefill-2"  # past every index in use by a prefill worker


def test_add_authorizes_the_new_key_everywhere_before_launching(tmp_path):
    fleet = FakeFleet([_slot("prefill-0", "prefill", "hgx01", 0), _slot("decode-0", "decode", "hgx01", 1),
                       _slot("decode-1", "decode", "hgx01", 2, state="loading")])
    fleet.slots["decode-1"].registered = True
    keys = DeploymentKeys.generate(["daemon", "prefill-0", "decode-0", "decode-1"])
    scaler, sent, store = _scaler(fleet, tmp_path, keys)
    new_id = asyncio.run(scaler.add(ScalingAction("add", None, "decode", "load step")))
    assert new_id == "decode-2" and fleet.launched == ["decode-2"]
    public = keys.clients["decode-2"][0]
    assert sorted(pid for pid, action, args in sent if action == "authorize" and args["public_keys"] == [public]) \
        == ["decode-0", "decode-1", "prefill-0"]
    assert "decode-2" in DeploymentKeys.load(store.keys_path).clients  # a restarted daemon admits it too
    assert scaler.log.to_dict()["actions"][-1]["outcome"] == "ok"


def test_add_without_free_gpus_is_reported_not_raised(tmp_path):
    slots = [_slot(f"decode-{i}", "decode", node, g, pid=None) for i, (node, g) in
             enumerate((n, g) for n in ("hgx01", "hgx02") for g in range(8))]
    fleet = FakeFleet(slots)
    scaler, _, _ = _scaler(fleet, tmp_path)
    assert asyncio.run(scaler.add(ScalingAction("add", None, "decode", "load"))) is None
    assert fleet.launched == [] and "no room" in fleet.events[-1]
    assert scaler.log.to_dict()["actions"][-1]["outcome"] == "failed"


def test_remove_drains_first_then_stops_then_forgets(tmp_path):
    worker = _slot("decode-1", "decode", "hgx01", 1, pid=777)
    worker.metrics = {"in_flight": 2.0, "num_running": 2.0}
    fleet = FakeFleet([_slot("decode-0", "decode", "hgx01", 0, pid=776), worker])
    fleet.nodes.running = {776, 777}
    scaler, sent, _ = _scaler(fleet, tmp_path, heartbeat_interval_s=0.05, stop_s=3.0)

    async def scenario() -> bool:
        async def worker_side() -> None:
            while ("decode-1", "drain", {}) not in sent:
                await asyncio.sleep(0.01)
            assert worker.state == "draining"
            await asyncio.sleep(0.2)  # its last two requests finish, then a heartbeat says so
            worker.metrics = {"in_flight": 0.0, "num_running": 0.0}
            worker.heard(time.monotonic())
            while ("decode-1", "stop", {}) not in sent:
                await asyncio.sleep(0.01)
            fleet.nodes.running.discard(777)

        side = asyncio.create_task(worker_side())
        gone = await scaler.remove(ScalingAction("remove", "decode-1", "decode", "surplus"))
        await side
        return gone

    assert asyncio.run(scenario())
    assert [(p, a) for p, a, _ in sent] == [("frontend", "update_workers"), ("decode-1", "drain"),
                                            ("decode-1", "stop"), ("frontend", "update_workers")]
    assert "decode-1" not in fleet.slots and fleet.secrets_removed == ["decode-1"]
    assert any("decode-1: drained and stopped" in e for e in fleet.events)


def test_remove_kills_a_worker_that_ignores_stop(tmp_path):
    worker = _slot("decode-1", "decode", "hgx01", 1, state="starting", pid=777)  # never ready: no drain
    fleet = FakeFleet([worker])
    fleet.nodes.running = {777}
    scaler, sent, _ = _scaler(fleet, tmp_path, stop_s=0.3)
    assert asyncio.run(scaler.remove(ScalingAction("remove", "decode-1", "decode", "surplus")))
    assert [a for _, a, _ in sent] == ["update_workers"] and "decode-1" not in fleet.slots


def test_a_restarted_daemon_supervises_what_the_planner_left_running():
    placement = place(load_topology(ROOT / "topologies/hgx-h100x8.yaml"), RECIPE)
    records = (ProcessRecord("frontend", "frontend", "hgx01", (), 1, "", "", ""),
               ProcessRecord("prefill-0", "prefill", "hgx01", (0,), 2, "", "", "", "ready"),
               ProcessRecord("decode-0", "prefill", "hgx01", (1,), 3, "", "", "", "ready"),  # flipped
               ProcessRecord("decode-2", "decode", "hgx02", (0,), 4, "", "", "", "ready"))  # added; decode-1 retired
    slots = worker_slots(placement, Snapshot(None, "running", records))
    assert [(s.id, s.role, s.node, s.gpus) for s in slots] == [
        ("prefill-0", "prefill", "hgx01", (0,)), ("decode-0", "prefill", "hgx01", (1,)),
        ("decode-2", "decode", "hgx02", (0,))]
    assert [s.id for s in worker_slots(placement, None)] == ["prefill-0", "decode-0", "decode-1"]


def test_a_second_daemon_refuses_to_run_beside_a_live_one(tmp_path):
    import subprocess

    import pytest

    from dyn.errors import DeploymentError
    from dyn.planner.daemon import PlannerDaemon
    from dyn.planner.state import DaemonRecord
    from test_daemon import _store

    store = _store(tmp_path)
    # a process whose command line looks like this deployment's daemon
    other = subprocess.Popen(["sh", "-c", "sleep 30", "planner", str(store.deployment_path)])
    try:
        store.save_snapshot(Snapshot(DaemonRecord("local", other.pid, "tcp://127.0.0.1:1", 0.0), "running", ()))
        with pytest.raises(DeploymentError, match=f"already has a running daemon \\(pid {other.pid}\\)"):
            asyncio.run(PlannerDaemon(store).run())
    finally:
        other.kill()
        other.wait(timeout=5)


def test_processes_drain_for_half_the_daemons_stop_deadline():
    """A stopped process fails what is left (retryable) before the daemon would kill it."""
    from dyn.planner.fleet import Fleet
    from dyn.planner.health import Deadlines
    from dyn.planner.state import Deployment

    root = Path(__file__).resolve().parents[2]
    text = (root / "topologies" / "local.yaml").read_text()
    deployment = Deployment("t", text, "name: t", "local.yaml", "t.yaml", "h", "local", ("dyn",), ("dyn",),
                            "http://127.0.0.1:8000", 0.0)
    fleet = Fleet(deployment, load_topology(root / "topologies" / "local.yaml"), None, None,  # type: ignore[arg-type]
                  Deadlines(stop_s=6.0))
    config = fleet._config(ProcessSlot("decode-0", "decode", "local", ()), None)
    assert config.drain_grace_s == 3.0
