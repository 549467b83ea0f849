"""The daemon's control plane: answer Register, Heartbeat and CliRequest; push worker lists; status.

A mixin of PlannerDaemon (dyn.planner.daemon) plus the helpers it needs: the
control ROUTER's bind (reusing the previous port, so running processes
reconnect and are adopted) and the daemon's own CPU and memory figures.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from dyn import __version__
from dyn.control.messages import CONTROL_CODEC, CliReply, CliRequest, Command, Heartbeat, Register, RegisterAck
from dyn.control.sockets import Security, receive_routed, server_socket, tcp_address
from dyn.planner.policy import StaticPolicy
from dyn.planner.report import planner_status, relaunch_time_s, status_payload, worker_list
from dyn.planner.state import Snapshot

log = logging.getLogger("dyn.planner.daemon")
"""The daemon logs under one name, as before daemon.py was split."""


class DaemonControl:
    """Messages in and out of the daemon's control ROUTER (`self._sock`)."""

    async def _receive(self) -> None:
        while True:
            received = await receive_routed(self._sock, CONTROL_CODEC, self.bad)
            self.num_messages += 1
            if received is None:
                continue
            identity, message = received
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
        if request.action == "weight_peers":
            return self._on_weight_peers(request.args)
        return CliReply(ok=False, error=f"unknown action {request.action!r} (known: status, down, ping, weight_peers)")

    def _on_weight_peers(self, args: dict[str, Any]) -> CliReply:
        """A starting worker asks where to stream its weights from (dyn.planner.weight_peers)."""
        from dyn.planner.weight_peers import weight_peers
        from dyn.shuttle.transports.nixl import is_available as nixl_available

        asker, key = args.get("process_id"), args.get("key")
        if not isinstance(asker, str) or not isinstance(key, str):
            return CliReply(ok=False, error="weight_peers needs process_id and key strings")
        payload = weight_peers(list(self.fleet.slots.values()), asker, key, self._topology, self._recipe,
                               nixl_available=nixl_available())
        return CliReply(ok=True, payload={**payload, "nonce": str(args.get("nonce", ""))})

    def status(self, detail: bool = False) -> dict[str, Any]:
        """The CLI's view; with detail (`dyn top`), every heartbeat metric, NVLink domains and SLOs."""
        d = self.deployment
        daemon = {"pid": os.getpid(), "address": self.daemon_record.address, "node": self.daemon_record.node,
                  "messages_total": self.num_messages, "bad_messages": self.bad.total,
                  "cpu_percent": round(self._cpu.sample(), 1), "rss_bytes": rss_bytes(),
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
        # Replicas share their in-flight load: each learns the others' PUB addresses here.
        replicas = {s.id: s.addresses["load"] for s in frontends if isinstance(s.addresses.get("load"), str)}
        slots = list(self.fleet.slots.values())
        command = Command("update_workers", {"workers": worker_list(slots, self._topology), "frontends": replicas,
                                             "relaunch_s": relaunch_time_s(slots)})
        for slot in frontends:
            await self._send(slot.id, command)

    async def _send(self, process_id: str, message) -> None:
        await self._sock.send_multipart([process_id.encode(), CONTROL_CODEC.encode(message)])


def bind_router(ctx: zmq.asyncio.Context, host: str, security: Security,
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


class CpuMeter:
    """CPU percent of this process between two samples."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), time.process_time())

    def sample(self) -> float:
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._last
        self._last = (now, cpu)
        return 100.0 * (cpu - cpu_then) / max(now - then, 1e-6)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
