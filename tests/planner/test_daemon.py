"""The real daemon, in this process, supervising real `dyn worker` processes (mock engine, local node).

Covers what the sshd end-to-end tests do not: the heartbeat deadline (a
SIGSTOPped worker), the restart budget, adoption by a restarted daemon, and
refusals on the control plane. Every pid seen is killed in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from dyn.control.keys import DeploymentKeys, write_private
from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest
from dyn.control.messages import CONTROL_CODEC, Command, Heartbeat, Register, RegisterAck
from dyn.control.requests import REQUEST_CODEC
from dyn.control.sockets import Security, client_socket
from dyn.deploy.client import request
from dyn.launch.local import pid_alive
from dyn.errors import DeploymentError
from dyn.planner.daemon import PlannerDaemon
from dyn.planner.daemon_launch import host_groups
from dyn.planner.health import ProcessSlot
from dyn.planner.state import Deployment, StateStore

DYN = str(Path(sys.executable).with_name("dyn"))
TOPOLOGY = """name: t
head: local
racks:
  - name: r
    nodes:
      - name: local
        address: local
"""
RECIPE = """name: d
model: {engine: mock}
mode: aggregated
workers:
  both: {replicas: 2}
frontend: {port: 1}
shuttle: {max_inflight_mib: 4}
"""


def _store(tmp_path: Path, recipe: str = RECIPE, workers: int = 2, dyn_command: tuple[str, ...] = (DYN,),
           **timeouts: float) -> StateStore:
    store = StateStore("d", root=tmp_path / "state")
    keys = DeploymentKeys.generate(["daemon", "cli", "frontend", *(f"worker-{i}" for i in range(workers))])
    store.dir.mkdir(parents=True)
    keys.save(store.keys_path)
    write_private(store.cli_keys_path, keys.for_process("cli").to_json())
    store.save_deployment(Deployment(
        name="d", topology_text=TOPOLOGY, recipe_text=recipe, topology_source="t.yaml", recipe_source="r.yaml",
        config_hash="x", head="local", dyn_command=dyn_command, remote_dyn_command=dyn_command,
        frontend_url="http://127.0.0.1:1", created_at=time.time(), node_state_root=str(tmp_path / "nodes"),
        timeouts={"heartbeat_s": 3.0, "register_s": 30.0, "restart_backoff_s": 0.2, **timeouts}))
    return store


class _WorkersOnly(PlannerDaemon):
    """The frontend is another engineer's process; these tests supervise workers only."""

    async def _launch_pending(self) -> None:
        self.fleet.slots.pop("frontend", None)
        await super()._launch_pending()


@contextlib.asynccontextmanager
async def _running(daemon: PlannerDaemon):
    """The daemon's run() as a task, cancelled on the way out unless it ended."""
    task = asyncio.create_task(daemon.run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s: {what}")


def _kill(pids: set[int]) -> None:
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def test_heartbeat_deadline_relaunch_budget_and_adoption(tmp_path):
    store = _store(tmp_path, max_restarts=1)
    pids: set[int] = set()

    async def scenario():
        daemon = _WorkersOnly(store)
        async with _running(daemon) as task:
            await _until(lambda: daemon.phase != "starting", 40, "both workers ready")
            assert daemon.phase == "running", (daemon.error, daemon.fleet.events)
            slots = daemon.fleet.slots
            pids.update(s.pid for s in slots.values())
            victim = slots["worker-0"]
            old_pid = victim.pid
            os.kill(old_pid, signal.SIGSTOP)  # alive to `kill -0`, silent on the control plane
            await _until(lambda: victim.num_restarts == 1 and victim.state == "ready", 30, "relaunch after silence")
            assert "missed heartbeats" in victim.last_failure and victim.pid != old_pid
            pids.add(victim.pid)
            assert not pid_alive(old_pid)  # the hung one was killed, not left holding its GPUs

            os.kill(victim.pid, signal.SIGKILL)  # budget is 1: now it stays down
            await _until(lambda: victim.state == "gave_up", 20, "restart budget spent")
            await _until(lambda: daemon.phase == "degraded", 5, "deployment degraded")
            assert slots["worker-1"].state == "ready"

            # a restarted daemon adopts the survivor without relaunching it
            survivor = slots["worker-1"].pid
            daemon._stop.set()  # SIGTERM path: daemon exits, processes stay
            await asyncio.wait_for(task, 20)
        assert pid_alive(survivor)
        daemon2 = _WorkersOnly(store)
        async with _running(daemon2) as task:
            await _until(lambda: getattr(daemon2, "fleet", None) is not None
                         and daemon2.fleet.slots["worker-1"].state == "ready", 20, "adoption")
            assert daemon2.fleet.slots["worker-1"].pid == survivor
            assert "adopting pid" in " ".join(daemon2.fleet.events)

            status = await request(store, "status")
            assert {w["id"]: w["state"] for w in status["workers"]}["worker-1"] == "ready"
            with pytest.raises(DeploymentError, match="unknown action 'explode'"):
                await request(store, "explode")
            await _refusals(daemon2, store)

            pids.update(s.pid for s in daemon2.fleet.slots.values() if s.pid)  # worker-0 got a fresh start
            await request(store, "down")
            await asyncio.wait_for(task, 30)
            assert daemon2.phase == "stopped"
            assert not any(pid_alive(p) for p in pids)

    try:
        asyncio.run(scenario())
    finally:
        _kill(pids)


def test_host_groups_put_workers_k_to_a_process_and_frontends_alone():
    slots = [ProcessSlot("frontend", "frontend", "n", ())] + [ProcessSlot(f"w{i}", "both", "n", ()) for i in range(5)]
    assert [[s.id for s in g] for g in host_groups(slots, 2)] == [["frontend"], ["w0", "w1"], ["w2", "w3"], ["w4"]]
    assert [[s.id for s in g] for g in host_groups(slots, 1)] == [["frontend"], ["w0"], ["w1"], ["w2"], ["w3"],
                                                                  ["w4"]]


HOSTED_RECIPE = """name: d
model: {engine: mock, mock_workers_per_process: 2}
mode: aggregated
workers:
  both: {replicas: 3}
frontend: {port: 1}
"""


def test_hosted_mock_workers_share_a_process_and_its_fate_then_come_back_alone(tmp_path):
    """model.mock_workers_per_process: 2 of 3 workers in one process, each with its own log; one
    of them stopped ends its host (the other drains too), and the daemon relaunches both alone."""
    store = _store(tmp_path, HOSTED_RECIPE, workers=3)
    pids: set[int] = set()

    async def scenario():
        daemon = _WorkersOnly(store)
        async with _running(daemon) as task:
            await _until(lambda: daemon.phase != "starting", 40, "three workers ready")
            assert daemon.phase == "running", (daemon.error, daemon.fleet.events)
            w0, w1, w2 = (daemon.fleet.slots[f"worker-{i}"] for i in range(3))
            pids.update((w0.pid, w2.pid))
            assert w0.pid == w1.pid != w2.pid
            assert "hosting worker-1" in " ".join(daemon.fleet.events)
            # one ZMQ context for both (one I/O thread, SCHED_BATCH: a mock steps on the event loop),
            assert _zmq_io_policies(w0.pid) == [os.SCHED_BATCH]  # one ZAP handler:
            for slot in (w0, w1):  # a CURVE client (the frontend's keys) is admitted by each
                assert await _kv_snapshot(store, slot.addresses["request"]) == slot.id
            for slot in (w0, w1):  # each hosted worker's lines are in its own log, under its name
                lines = [json.loads(line) for line in Path(slot.log_path).read_text().splitlines()
                         if line.startswith("{")]
                ready = [e for e in lines if e["msg"].startswith("worker ") and " ready in " in e["msg"]]
                assert [e["process"] for e in ready] == [slot.id], lines
                assert {e["process"] for e in lines if e["logger"].startswith("dyn.worker.process")} == {slot.id}

            host = w0.pid
            await daemon._send("worker-1", Command("stop"))
            await _until(lambda: not pid_alive(host), 20, "the host exits with its stopped worker")
            await _until(lambda: all(s.state == "ready" and s.num_restarts == 1 for s in (w0, w1)), 40,
                         "both hosted workers relaunched")
            pids.update((w0.pid, w1.pid))
            assert len({w0.pid, w1.pid, w2.pid, host}) == 4  # each alone now; worker-2 untouched
            assert w2.num_restarts == 0

            await request(store, "down")
            await asyncio.wait_for(task, 30)
            assert daemon.phase == "stopped" and not any(pid_alive(p) for p in pids)

    try:
        asyncio.run(scenario())
    finally:
        _kill(pids)


def _zmq_io_policies(pid: int) -> list[int]:
    """The scheduling policy of each ZMQ I/O thread of a process."""
    return [os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")
            if Path(f"/proc/{pid}/task/{t}/comm").read_text().startswith("ZMQbg/IO")]


async def _kv_snapshot(store: StateStore, address: str) -> str:
    """Ask a worker's request plane for its KV snapshot as the frontend would; the worker id in it."""
    keys = DeploymentKeys.load(store.keys_path).for_process("frontend")
    ctx = zmq.asyncio.Context()
    sock = client_socket(ctx, zmq.DEALER, address, Security.from_keys(keys))
    try:
        await sock.send(REQUEST_CODEC.encode(KvSnapshotRequest("?")))
        reply = REQUEST_CODEC.decode(await asyncio.wait_for(sock.recv(), 10))
        assert isinstance(reply, KvSnapshot)
        return reply.worker_id
    finally:
        sock.close(linger=0)
        ctx.term()


def test_down_before_workers_register_stops_them_at_once(tmp_path):
    """A process that has not registered cannot be told to stop, and holds no request: `down`
    signals it at once instead of waiting out stop_s (a `dyn down` while models load)."""
    never_registers = (sys.executable, "-c", "import time; time.sleep(300)")
    store = _store(tmp_path, dyn_command=never_registers, register_s=120.0, stop_s=120.0)
    pids: set[int] = set()

    async def scenario():
        daemon = _WorkersOnly(store)
        async with _running(daemon) as task:
            slots = await _until(lambda: (f := getattr(daemon, "fleet", None)) is not None and len(f.slots) == 2
                                 and all(s.pid for s in f.slots.values()) and f.slots, 20, "both launched")
            pids.update(s.pid for s in slots.values())
            assert not any(s.registered for s in slots.values())
            await request(store, "down")
            await asyncio.wait_for(task, 30)
            assert daemon.phase == "stopped"
            assert not any(pid_alive(p) for p in pids)

    try:
        asyncio.run(scenario())
    finally:
        _kill(pids)


async def _refusals(daemon: PlannerDaemon, store: StateStore) -> None:
    """Unknown ids, identity spoofing and unregistered heartbeats get RegisterAck(ok=False)."""
    keys = DeploymentKeys.load(store.keys_path)
    ctx = zmq.asyncio.Context()
    address = daemon.daemon_record.address
    try:
        async def ask(identity: bytes, message) -> RegisterAck:
            sock = client_socket(ctx, zmq.DEALER, address, Security.from_keys(keys.for_process("cli")),
                                 identity=identity)
            try:
                await sock.send(CONTROL_CODEC.encode(message))
                return CONTROL_CODEC.decode_as(await asyncio.wait_for(sock.recv(), 5), RegisterAck)
            finally:
                sock.close(linger=0)

        ack = await ask(b"ghost", Register("ghost", "decode", "local", 1, "0.1.0"))
        assert not ack.ok and "unknown process id 'ghost'" in ack.reason
        ack = await ask(b"impostor", Register("worker-1", "both", "local", 1, "0.1.0"))
        assert not ack.ok and "identity" in ack.reason
        ack = await ask(b"impostor-2", Heartbeat("worker-1", "ready"))  # a registered id, from elsewhere
        assert not ack.ok and "not registered" in ack.reason
    finally:
        ctx.term()


