"""The planner daemon: owns one deployment from launch to `dyn down`.

Startup: read the deployment record, compute placement, bind the control
ROUTER (reusing the previous port after a daemon restart, so running
processes reconnect and are adopted), publish its address in the snapshot,
launch what is not running. Main loop: answer every message (Register ->
RegisterAck, Heartbeat -> RegisterAck as keepalive, CliRequest ->
CliReply), check deadlines and pids, relaunch within the restart budget,
push the worker list to frontends, consult the ScalingPolicy (the SLO
planner when the recipe enables it: `dyn.planner.slo_policy`) and carry out
its actions (`dyn.planner.scaling`), persist. Failed processes are killed for
sure, then relaunched (`dyn.planner.repair`).
Shutdown: on `down`, drain and stop every process, then kill what is left;
on SIGTERM/SIGINT (or SIGKILL), the processes keep running; the next daemon
(`dyn up`, or a supervisor: scripts/dyn-planner.service) adopts them, same
pids, from processes.json and their re-registrations (`dyn.planner.adoption`).
Signal handlers only set flags.

Here: startup, the main loop, the phase, the policy, persistence. Messages
(Register, Heartbeat, CliRequest, worker lists, status) are
`dyn.planner.daemon_control`; launching, repair and stopping processes are
`dyn.planner.daemon_launch`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import zmq.asyncio

from dyn.control.client import wait_event
from dyn.control.keys import DeploymentKeys
from dyn.control.sockets import BadMessages, Security
from dyn.errors import DeploymentError, DynError
from dyn.metrics.daemon import daemon_registry
from dyn.metrics.server import MetricsServer
from dyn.planner.adoption import live_daemon, worker_slots
from dyn.planner.daemon_control import CpuMeter, DaemonControl, bind_router
from dyn.planner.daemon_launch import DaemonLaunching
from dyn.planner.daemon_proc import pid_path
from dyn.planner.decisions import DecisionLog, PlannerCollector
from dyn.planner.fleet import Fleet
from dyn.planner.health import Deadlines, ProcessSlot
from dyn.planner.nodes import LaunchNodes, Nodes
from dyn.planner.policy import ScalingPolicy, StaticPolicy, WorkerView
from dyn.planner.scaling import Scaler
from dyn.planner.slo_policy import choose_policy
from dyn.planner.state import DaemonRecord, Snapshot, StateStore, atomic_write

log = logging.getLogger(__name__)

TICK_S = 0.25


class PlannerDaemon(DaemonControl, DaemonLaunching):
    """One deployment's daemon; its control plane and process handling are the mixins' (see above)."""

    def __init__(self, store: StateStore, *, nodes: Nodes | None = None,
                 policy: ScalingPolicy | None = None) -> None:
        self.store = store
        self.deployment = store.load_deployment()
        self.deadlines = Deadlines.from_overrides(self.deployment.timeouts)
        self.policy: ScalingPolicy = policy or StaticPolicy()
        self._policy_given = policy is not None
        self.policy_note = "given by the caller" if policy is not None else ""
        self.decision_log = DecisionLog()
        self._nodes = nodes
        self.phase = "starting"
        self.error = ""
        self.started_at = time.time()
        self.bad = BadMessages("daemon control")
        self.num_messages = 0
        self._stop = asyncio.Event()
        self._stop_mode = "detach"
        self._tasks: set[asyncio.Task] = set()
        self._last_saved: tuple | None = None
        self._sweep: asyncio.Task | None = None
        self._saving = False
        self._max_lag_s = 0.0
        self._cpu = CpuMeter()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        from dyn.config.loader import parse_recipe, parse_topology
        from dyn.config.scaling import scale_to_topology
        from dyn.topology.frontends import place_frontends
        from dyn.topology.placement import place

        d = self.deployment
        topology = parse_topology(d.topology_text, d.topology_source)
        recipe = scale_to_topology(parse_recipe(d.recipe_text, d.recipe_source), topology)
        placement = place(topology, recipe)
        keys = DeploymentKeys.load(self.store.keys_path) if recipe.auth.curve else None
        previous = self.store.load_snapshot()
        adopting = previous is not None and previous.phase in ("starting", "running", "degraded")
        other = live_daemon(previous, topology.head, d.name) if adopting else None
        if other is not None:
            raise DeploymentError(f"deployment {d.name!r} already has a running daemon (pid {other}); "
                                  "not starting a second one")
        atomic_write(pid_path(self.store), str(os.getpid()))

        ctx = zmq.asyncio.Context()
        security = Security.from_keys(keys.for_process("daemon") if keys else None)
        self._sock, address = bind_router(ctx, topology.head_node.bind_address, security, previous)
        nodes = self._nodes or LaunchNodes(topology, accept_new_host_keys=d.accept_new_host_keys,
                                           node_state_root=d.node_state_root, deployment=d.name)
        self.fleet = Fleet(d, topology, keys, nodes, self.deadlines, daemon_address=address,
                           heartbeat_interval_s=self.deadlines.heartbeat_interval_s,
                           daemon_grace_s=self.deadlines.daemon_grace_s)
        budget = restart_budget(recipe, self.deployment.timeouts)
        for fe in place_frontends(topology, recipe):
            self.fleet.add(ProcessSlot(fe.id, "frontend", fe.node, ()), **budget)
            self.fleet.extra[fe.id] = {"http_host": fe.host, **({"reuse_port": "1"} if fe.shares_port else {})}
        for slot in worker_slots(placement, previous if adopting else None):
            self.fleet.add(slot, **budget)
        if not self._policy_given:
            self.policy, self.policy_note = choose_policy(recipe, topology, d.recipe_source)
        self.scaler = Scaler(self.fleet, topology, recipe, keys, self.store, security, self.deadlines,
                             self.decision_log, send=self._send, push_workers=self._push_workers,
                             budget=budget)
        self._recipe = recipe
        self.daemon_record = DaemonRecord(node=topology.head, pid=os.getpid(), address=address,
                                          started_at=self.started_at)
        # issue 8 (dyn top, metrics): SLO targets and NVLink domains for the detailed status,
        # and the daemon's own Prometheus endpoint on the head node's bind address.
        self._slo = {"ttft_ms": recipe.planner.ttft_ms, "itl_ms": recipe.planner.itl_ms}
        self._topology = topology
        registry = daemon_registry(self.status)
        registry.register(PlannerCollector(d.name, lambda: self.decision_log,
                                           lambda: not isinstance(self.policy, StaticPolicy)))
        self.metrics_server = MetricsServer(registry, topology.head_node.bind_address)
        await self.metrics_server.start()
        self.fleet.note(f"scaling: {self.policy_note}")
        if adopting:
            for record in previous.processes:
                self.fleet.adopt(record)
            self.phase = "running" if previous.phase != "starting" else "starting"
        self._persist(force=True)
        aio = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio.add_signal_handler(sig, self._stop.set)
        log.info("daemon for %s listening on %s", d.name, address)
        try:
            async with nodes:
                receiver = asyncio.create_task(self._receive())
                self._spawn(self._watch_lag())
                self._spawn(self._launch_pending())
                try:
                    await self._main_loop()
                finally:
                    if self._stop_mode == "down":
                        await self._stop_everything()
                    receiver.cancel()
                    for task in list(self._tasks):
                        task.cancel()
                    await asyncio.gather(receiver, *self._tasks, return_exceptions=True)
        finally:
            await self.metrics_server.close()
            self._persist(force=True)
            self._sock.close(linger=0)
            security.stop()
            ctx.term()
        return 0

    async def _main_loop(self) -> None:
        next_sweep = next_push = next_policy = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in list(self.fleet.slots.values()):
                reason = slot.overdue(now, self.deadlines)
                if reason:
                    self._fail(slot, reason, hung=True)
            if now >= next_sweep:
                next_sweep = now + self.deadlines.liveness_interval_s
                if not self.store.deployment_path.exists():
                    log.error("%s is gone: the deployment was removed; stopping it", self.store.deployment_path)
                    self._stop_mode = "down"
                    break
                if self._sweep is None or self._sweep.done():
                    # Off the loop: a probe of an unreachable node waits out its SSH timeout, and
                    # heartbeat deadlines and worker-list pushes must not wait with it.
                    self._sweep = asyncio.create_task(self._sweep_once())
                    self._tasks.add(self._sweep)
                    self._sweep.add_done_callback(self._tasks.discard)
            self._update_phase()
            if now >= next_push:
                next_push = now + self.deadlines.heartbeat_interval_s
                await self._push_workers()
            if self.phase == "running" and now >= next_policy:
                next_policy = now + self.policy.interval_s
                await self._apply_policy(now)
            self._persist()
            await wait_event(self._stop, TICK_S)

    async def _sweep_once(self) -> None:
        if await self._launcher_ended():
            return
        probed = {slot.id: slot.pid for slot in self.fleet.slots.values()}
        for slot_id, reason in (await self.fleet.sweep()).items():
            slot = self.fleet.slots.get(slot_id)
            if slot is not None and slot.is_active and slot.pid == probed.get(slot_id):
                self._fail(slot, reason)  # (a slot relaunched meanwhile has a new pid: not this one)

    async def _launcher_ended(self) -> bool:
        """A Slurm allocation that ended took every step with it: nothing is left to supervise or
        relaunch, so record why (phase "ended", every process exited) and stop the daemon."""
        gone = getattr(self.fleet.nodes, "launcher_gone", None)
        try:
            reason = await gone() if gone is not None else None
        except DynError as exc:
            log.warning("cannot check the launcher: %s", exc)
            return False
        if reason is None:
            return False
        log.error("%s: every process ended with it; the daemon stops", reason)
        now = time.monotonic()
        for slot in self.fleet.slots.values():
            slot.set_state("exited", now, reason)
        self.phase, self.error = "ended", reason
        self.fleet.note(f"{reason}; `dyn down --name {self.deployment.name}` forgets the deployment")
        self._stop_mode = "detach"
        self._stop.set()
        return True

    async def _watch_lag(self, period_s: float = 0.5) -> None:
        """Measure how late the event loop wakes up: the figure that says the daemon is starved."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(period_s)
            lag = time.monotonic() - start - period_s
            if lag > 1.0:
                log.warning("event loop stalled for %.1f s (host overloaded?)", lag)
            self._max_lag_s = max(self._max_lag_s, lag)

    def _update_phase(self) -> None:
        slots = list(self.fleet.slots.values())
        if self.phase == "starting":
            failed = [s for s in slots if s.state == "failed"]
            if failed:
                self.phase = "failed"
                self.error = "; ".join(f"{s.id} on {s.node}: {s.error}" for s in failed)
            elif all(s.state == "ready" for s in slots):
                self.phase = "running"
                self.fleet.note(f"all {len(slots)} processes ready")
        elif self.phase in ("running", "degraded"):
            self.phase = "degraded" if any(s.state == "gave_up" for s in slots) else "running"

    # -- scaling policy --------------------------------------------------------------------------

    async def _apply_policy(self, now: float) -> None:
        """Ask the policy, record its decisions, carry out its actions (launches and drains run as
        tasks; the policy is not consulted again while one is in progress)."""
        if self.scaler.in_progress:
            return
        views = [WorkerView.of(s) for s in self.fleet.slots.values() if s.state != "exited"]
        actions = self.policy.decide(views, now)
        for decision in self.policy.take_decisions():
            self.decision_log.decision(decision.to_dict())
            if decision.action != "hold":
                self.fleet.note(f"planner: {decision.action} {decision.role} x{decision.num_workers} "
                                f"({decision.reason})")
        for action in actions:
            if action.kind == "set_role":
                await self.scaler.set_role(action)
            elif action.kind == "add":
                self._spawn(self.scaler.add(action))
            elif action.kind == "remove":
                self._spawn(self.scaler.remove(action))

    # -- persistence -----------------------------------------------------------------------------

    def _persist(self, force: bool = False) -> None:
        """Save the snapshot when it changed: inline when forced (startup, shutdown), else on a
        thread, one save at a time, so a slow disk (fsync) never stalls the control plane."""
        records = self.fleet.records() if hasattr(self, "fleet") else ()
        key = (self.phase, self.error, tuple((r.id, r.role, r.state, r.pid, r.num_restarts) for r in records))
        if (not force and (key == self._last_saved or self._saving)) or not self.store.dir.is_dir():
            return
        self._last_saved = key
        snapshot = Snapshot(getattr(self, "daemon_record", None), self.phase, records, self.error)
        if force:
            self.store.save_snapshot(snapshot)
            return
        self._saving = True
        self._spawn(self._save_off_loop(snapshot))

    async def _save_off_loop(self, snapshot: Snapshot) -> None:
        try:
            await asyncio.to_thread(self.store.save_snapshot, snapshot)
        except OSError as exc:
            log.error("cannot save %s: %s", self.store.snapshot_path, exc)
            self._last_saved = None
        finally:
            self._saving = False

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def restart_budget(recipe, timeouts: dict[str, float]) -> dict:
    """Relaunches per process and window: the recipe's planner.max_restarts/restart_window_s,
    unless the (hidden) --timeouts override names them."""
    return {"max_restarts": int(timeouts.get("max_restarts", recipe.planner.max_restarts)),
            "window_s": float(timeouts.get("restart_window_s", recipe.planner.restart_window_s))}
