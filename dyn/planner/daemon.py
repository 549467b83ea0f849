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
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import zmq
import zmq.asyncio

from dyn import __version__
from dyn.control.client import wait_event
from dyn.control.keys import DeploymentKeys
from dyn.control.messages import (CONTROL_CODEC, CliReply, CliRequest, Command, Heartbeat, Register,
                                  RegisterAck)
from dyn.errors import DynError
from dyn.control.sockets import BadMessages, Security, decode_or_record, server_socket, tcp_address
from dyn.metrics.daemon import daemon_registry
from dyn.metrics.server import MetricsServer
from dyn.errors import DeploymentError
from dyn.planner.adoption import live_daemon, worker_slots
from dyn.planner.daemon_proc import pid_path
from dyn.planner.decisions import DecisionLog, PlannerCollector
from dyn.planner.fleet import Fleet
from dyn.planner.health import Deadlines, ProcessSlot
from dyn.planner.nodes import LaunchNodes, Nodes
from dyn.planner.policy import ScalingPolicy, StaticPolicy, WorkerView
from dyn.planner.repair import mark_failed, repair
from dyn.planner.report import planner_status, status_payload, worker_list
from dyn.planner.scaling import Scaler
from dyn.planner.slo_policy import choose_policy
from dyn.planner.state import DaemonRecord, Snapshot, StateStore, atomic_write

log = logging.getLogger(__name__)

TICK_S = 0.25
LAUNCH_CONCURRENCY = 8


class PlannerDaemon:
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
        self._cpu = _CpuMeter()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        from dyn.config.loader import parse_recipe, parse_topology
        from dyn.topology.placement import place

        d = self.deployment
        topology = parse_topology(d.topology_text, d.topology_source)
        recipe = parse_recipe(d.recipe_text, d.recipe_source)
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
        self._sock, address = _bind(ctx, topology.head_node.bind_address, security, previous)
        nodes = self._nodes or LaunchNodes(topology, accept_new_host_keys=d.accept_new_host_keys,
                                           node_state_root=d.node_state_root, deployment=d.name)
        self.fleet = Fleet(d, topology, keys, nodes, self.deadlines, daemon_address=address,
                           heartbeat_interval_s=self.deadlines.heartbeat_interval_s,
                           daemon_grace_s=self.deadlines.daemon_grace_s)
        budget = {"max_restarts": int(self.deadlines.max_restarts), "window_s": self.deadlines.restart_window_s}
        self.fleet.add(ProcessSlot("frontend", "frontend", topology.head, ()), **budget)
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
                    self._fail(slot, reason)
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
        probed = {slot.id: slot.pid for slot in self.fleet.slots.values()}
        for slot_id, reason in (await self.fleet.sweep()).items():
            slot = self.fleet.slots.get(slot_id)
            if slot is not None and slot.is_active and slot.pid == probed.get(slot_id):
                self._fail(slot, reason)  # (a slot relaunched meanwhile has a new pid: not this one)

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

    # -- failures and relaunch (dyn.planner.repair) ----------------------------------------------

    def _fail(self, slot: ProcessSlot, reason: str) -> None:
        if mark_failed(self.fleet, slot, reason):
            self._spawn(repair(self.fleet, slot, self.deadlines,
                               can_relaunch=lambda: self.phase in ("running", "degraded") and not self._stop.is_set()))

    async def _launch_pending(self) -> None:
        """Launch every pending slot: one command per node writes all its files, then each
        process starts, with at most `max_starting` between launch and registration so an
        interpreter-start storm does not starve the daemon (or a shared host)."""
        gate = asyncio.Semaphore(LAUNCH_CONCURRENCY)
        limit = max(1, int(self.deadlines.max_starting))
        by_node: dict[str, list[ProcessSlot]] = {}
        for slot in self.fleet.slots.values():
            if slot.state == "pending":
                by_node.setdefault(slot.node, []).append(slot)

        async def prepare(node: str, slots: list[ProcessSlot]) -> list[ProcessSlot]:
            async with gate:
                try:
                    await self.fleet.write_files(node, slots)
                except (DynError, OSError, asyncio.TimeoutError) as exc:
                    for slot in slots:
                        self.fleet.fail_launch(slot, exc)
                    return []
            return slots

        async def start(slot: ProcessSlot) -> None:
            async with gate:
                while sum(1 for s in self.fleet.slots.values() if s.state in ("launching", "starting")) >= limit:
                    await asyncio.sleep(0.05)
                    if self._stop.is_set():
                        return
                await self.fleet.launch(slot, files_written=True)

        # frontend first, then workers interleaved across nodes (every node starts early)
        prepared = await asyncio.gather(*(prepare(n, s) for n, s in by_node.items()))
        order = sorted((slot for slots in prepared for slot in slots),
                       key=lambda s: (s.role != "frontend", [x.id for x in by_node[s.node]].index(s.id)))
        await asyncio.gather(*(start(s) for s in order), return_exceptions=True)

    async def _stop_everything(self) -> None:
        """Drain, stop, then SIGTERM and SIGKILL whatever is still alive; every step has a deadline."""
        self.phase = "stopping"
        self._persist(force=True)
        for slot in self.fleet.slots.values():
            if slot.registered:
                await self._send(slot.id, Command("stop"))
            if slot.is_active:
                slot.set_state("stopping", time.monotonic())
        deadline = time.monotonic() + self.deadlines.stop_s
        alive = await self._wait_gone(deadline)
        for sig, grace_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            if not alive:
                break
            await asyncio.gather(*(self.fleet.kill(s, sig) for s in alive))
            alive = await self._wait_gone(time.monotonic() + grace_s)
        for slot in self.fleet.slots.values():
            slot.set_state("exited" if slot not in alive else "stopping", time.monotonic())
        self.phase = "stopped" if not alive else "stopping"
        await self.fleet.remove_secrets([s for s in self.fleet.slots.values() if s not in alive])
        if alive:
            self.error = "still alive after SIGKILL: " + ", ".join(f"{s.id} (pid {s.pid} on {s.node})"
                                                                   for s in alive)

    async def _wait_gone(self, deadline: float) -> list[ProcessSlot]:
        while True:
            alive = await self.fleet.alive_slots()
            if not alive or time.monotonic() >= deadline:
                return alive
            await asyncio.sleep(0.2)

    # -- control plane ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.num_messages += 1
            if len(frames) != 2:
                self.bad.record("wrong frame count")
                continue
            identity, data = frames
            message = decode_or_record(CONTROL_CODEC, data, self.bad)
            if message is None:
                continue
            try:
                reply = self._handle(identity, message)
            except Exception:  # one bad request must never take the daemon down
                log.exception("handling %s failed", type(message).__name__)
                reply = CliReply(ok=False, error="internal error") if isinstance(message, CliRequest) else None
            if reply is not None:
                await self._sock.send_multipart([identity, CONTROL_CODEC.encode(reply)])

    def _handle(self, identity: bytes, message) -> Any:
        now = time.monotonic()
        if isinstance(message, Register):
            return self._on_register(identity, message, now)
        if isinstance(message, Heartbeat):
            slot = self.fleet.slots.get(message.process_id)
            if slot is None or not slot.registered or identity != slot.id.encode():
                return RegisterAck(ok=False, reason="not registered with this daemon")
            slot.heard(now)
            slot.metrics, slot.info = dict(message.metrics), dict(message.info)
            if message.state == "failed":
                self._fail(slot, f"reported failure: {message.info.get('error') or 'see its log'}")
            elif slot.state not in ("stopping", "failed", "gave_up", "exited", "draining", "retiring"):
                slot.set_state(message.state, now)
            return RegisterAck(ok=True, heartbeat_interval_s=self.deadlines.heartbeat_interval_s)
        if isinstance(message, CliRequest):
            return self._on_cli(message)
        self.bad.record(f"unexpected {type(message).__name__}")
        return None

    def _on_register(self, identity: bytes, msg: Register, now: float) -> RegisterAck:
        slot = self.fleet.slots.get(msg.process_id)
        if slot is None:
            return RegisterAck(ok=False, reason=f"unknown process id {msg.process_id!r}")
        if identity != msg.process_id.encode():
            return RegisterAck(ok=False, reason="socket identity does not match process id")
        if slot.state in ("failed", "gave_up", "exited", "stopping", "retiring") or self._stop.is_set():
            return RegisterAck(ok=False, reason=f"{slot.id} is {slot.state}; not accepting it")
        if slot.pid is not None and msg.pid != slot.pid and slot.registered:
            return RegisterAck(ok=False, reason=f"{slot.id} is already registered as pid {slot.pid}")
        resumed = slot.adopted_state if slot.adopted_state in ("ready", "draining") and msg.pid == slot.pid \
            else "loading"  # an adopted process that was serving resumes serving; frontends keep its streams
        slot.adopted_state = None
        slot.pid, slot.addresses, slot.registered = msg.pid, dict(msg.addresses), True
        slot.heard(now)
        slot.set_state(resumed, now)
        self.fleet.note(f"{slot.id}: registered from {msg.node} (pid {msg.pid})")
        return RegisterAck(ok=True, heartbeat_interval_s=self.deadlines.heartbeat_interval_s)

    def _on_cli(self, request: CliRequest) -> CliReply:
        if request.action == "status":
            return CliReply(ok=True, payload=self.status(detail=bool(request.args.get("detail"))))
        if request.action == "down":
            self._stop_mode = "down"
            self._stop.set()
            return CliReply(ok=True, payload={"stopping": True})
        if request.action == "ping":
            return CliReply(ok=True, payload={"pid": os.getpid(), "version": __version__})
        return CliReply(ok=False, error=f"unknown action {request.action!r} (known: status, down, ping)")

    def status(self, detail: bool = False) -> dict[str, Any]:
        """The CLI's view; with detail (`dyn top`), every heartbeat metric, NVLink domains and SLOs."""
        d = self.deployment
        daemon = {"pid": os.getpid(), "address": self.daemon_record.address, "node": self.daemon_record.node,
                  "messages_total": self.num_messages, "bad_messages": self.bad.total,
                  "cpu_percent": round(self._cpu.sample(), 1), "rss_bytes": _rss_bytes(),
                  "max_loop_lag_s": round(self._max_lag_s, 3), "metrics_url": self.metrics_server.url}
        return status_payload(name=d.name, phase=self.phase, started_at=d.created_at, wall_now=time.time(),
                              now=time.monotonic(), frontend_url=d.frontend_url, config_hash=d.config_hash,
                              slots=list(self.fleet.slots.values()), events=self.fleet.events,
                              error=self.error, daemon=daemon,
                              detail=(self._topology, self._slo) if detail else None,
                              planner=planner_status(self.policy_note, not isinstance(self.policy, StaticPolicy),
                                                     self.decision_log, getattr(self.policy, "last_window", None)),
                              topology=self._topology, recipe=self._recipe)

    async def _push_workers(self) -> None:
        frontends = [s for s in self.fleet.slots.values() if s.role == "frontend" and s.registered]
        if not frontends:
            return
        if any(s.adopted_state is not None and s.state == "starting" for s in self.fleet.slots.values()) \
                and time.time() - self.started_at < self.deadlines.heartbeat_s:
            # Adopted processes re-register within a heartbeat or two; until then the frontends'
            # own lists are right, and "starting" would make them fail those workers' streams.
            return
        command = Command("update_workers", {"workers": worker_list(list(self.fleet.slots.values()))})
        for slot in frontends:
            await self._send(slot.id, command)

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

    async def _send(self, process_id: str, message) -> None:
        await self._sock.send_multipart([process_id.encode(), CONTROL_CODEC.encode(message)])

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


def _bind(ctx: zmq.asyncio.Context, host: str, security: Security,
          previous: Snapshot | None) -> tuple[zmq.asyncio.Socket, str]:
    """Bind the control ROUTER, on the previous port when there was one (adoption)."""
    if previous is not None and previous.daemon is not None:
        try:
            sock = server_socket(ctx, zmq.ROUTER, previous.daemon.address, security)
            return sock, previous.daemon.address
        except zmq.ZMQError as exc:
            log.warning("cannot rebind %s (%s); running processes will be relaunched",
                        previous.daemon.address, exc)
    wildcard = tcp_address(host, 0)
    sock = server_socket(ctx, zmq.ROUTER, wildcard[: wildcard.rfind(":")] + ":*", security)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class _CpuMeter:
    def __init__(self) -> None:
        self._last = (time.monotonic(), time.process_time())

    def sample(self) -> float:
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._last
        self._last = (now, cpu)
        return 100.0 * (cpu - cpu_then) / max(now - then, 1e-6)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
