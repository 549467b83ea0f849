"""The daemon's scaling actions: launch one more worker, retire one, flip one's role.

Launch: place the worker next to the workers of the role it pairs with
(prefill <-> decode, inside one NVLink domain when there is room), give it a
fresh id and its own CURVE key pair, push that key to every running process
(so they admit it) before it starts, save the keys, and launch it through the
same path as a relaunch.

Retire (no request lost):

    ready --drain--> draining --in_flight == 0 (or stop_s)--> retiring --stop--> gone
      |                 |                                                  (SIGTERM, SIGKILL)
      |                 +-- frontends stop routing to it at once (it is no longer "ready")
      +-- not ready yet (never served): killed at once

A retiring slot is not "active": its exit is planned, not a failure to repair.

Flip: a set_role command; the worker keeps its engine, weights and KV cache
(torch workers run both ends of the shuttle, vLLM workers a kv_both
NixlConnector). Where the engine could not serve the new role
(flips_in_place), the worker is retired as above and one of the new role
launched.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Awaitable, Callable

from dyn.control.messages import Command
from dyn.errors import DynError
from dyn.planner.decisions import DecisionLog
from dyn.planner.health import Deadlines, ProcessSlot
from dyn.planner.policy import ScalingAction

if TYPE_CHECKING:
    from dyn.config.recipe import Recipe
    from dyn.config.topology import Topology
    from dyn.control.keys import DeploymentKeys
    from dyn.control.sockets import Security
    from dyn.planner.fleet import Fleet
    from dyn.planner.state import StateStore
    from dyn.topology.placement import Placement, WorkerPlacement

log = logging.getLogger(__name__)

Send = Callable[[str, Command], Awaitable[None]]
PAIRS = {"prefill": ("decode", "both"), "decode": ("prefill",), "both": ("prefill",)}
GONE_STATES = frozenset({"retiring", "exited"})


class Scaler:
    def __init__(self, fleet: "Fleet", topology: "Topology", recipe: "Recipe", keys: "DeploymentKeys | None",
                 store: "StateStore", security: "Security", deadlines: Deadlines, log_: DecisionLog, *,
                 send: Send, push_workers: Callable[[], Awaitable[None]],
                 budget: dict[str, float]) -> None:
        self.fleet, self.topology, self.recipe, self.keys = fleet, topology, recipe, keys
        self.store, self.security, self.deadlines, self.log = store, security, deadlines, log_
        self._send, self._push_workers, self._budget = send, push_workers, budget
        self.in_progress: set[str] = set()
        """Workers being launched or retired by a scaling action."""

    # ---- launch -----------------------------------------------------------------------------

    def place(self, role: str) -> "WorkerPlacement":
        """Where one more `role` worker goes (raises FitError when no GPUs are free)."""
        from dyn.topology.placement import place_one, worker_id

        used = self.used()
        wp = place_one(self.topology, self.recipe, role, used, prefer_domain=self._pair_domain(role))
        index = int(wp.id.rsplit("-", 1)[1])
        while wp.id in self.fleet.slots:  # ids of flipped workers keep their first role's name
            index += 1
            wp = replace(wp, id=worker_id(role, index))
        return wp

    async def add(self, action: ScalingAction) -> str | None:
        """Launch one worker of `action.role`; its id, or None when it could not be placed."""
        role = action.role or "decode"
        try:
            wp = self.place(role)
        except DynError as exc:
            self.fleet.note(f"planner wants one more {role} worker, but: {exc}")
            self.log.action("add", "", role, "failed", str(exc))
            return None
        slot = ProcessSlot(wp.id, wp.role, wp.node, tuple(wp.gpus), cpu_threads=wp.cpu_threads)
        self.in_progress.add(slot.id)
        try:
            await self._authorize(slot.id)
            self.fleet.add(slot, **self._budget)  # type: ignore[arg-type]
            domain = f" in NVLink domain {wp.nvlink_domain}" if wp.nvlink_domain else ""
            self.fleet.note(f"{slot.id}: launching on {wp.node}{domain} GPUs {list(wp.gpus)} ({action.reason})")
            await self.fleet.launch(slot)
            self.log.action("add", slot.id, role, "ok" if slot.state != "failed" else "failed", slot.error)
        finally:
            self.in_progress.discard(slot.id)
        return slot.id

    async def _authorize(self, process_id: str) -> None:
        """A key pair for the new process, admitted by the daemon and every running process first."""
        if self.keys is None:
            return
        self.keys.add(process_id)
        await asyncio.to_thread(self.keys.save, self.store.keys_path)
        public = self.keys.clients[process_id][0]
        self.security.authorizer.add([public])
        command = Command("authorize", {"public_keys": [public]})
        for slot in self.fleet.slots.values():
            if slot.registered and slot.state not in GONE_STATES:
                await self._send(slot.id, command)

    # ---- retire -----------------------------------------------------------------------------

    async def remove(self, action: ScalingAction) -> bool:
        """Drain, stop and forget one worker; True when it is gone."""
        slot = self.fleet.slots.get(action.worker_id or "")
        if slot is None or slot.role == "frontend" or slot.id in self.in_progress:
            self.log.action("remove", action.worker_id or "", action.role or "", "skipped",
                            "unknown, the frontend, or busy with another action")
            return False
        self.in_progress.add(slot.id)
        try:
            if slot.state == "ready" and slot.registered:
                await self._drain(slot, action.reason)
            slot.set_state("retiring", time.monotonic())
            if slot.registered:
                await self._send(slot.id, Command("stop"))
            gone = await self._wait_exit(slot)
            if not gone:
                for sig, grace_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
                    await self.fleet.kill(slot, sig)
                    if await self._wait_exit(slot, grace_s):
                        gone = True
                        break
            if not gone:
                # Not confirmed dead (its node is unreachable): keep the slot so `down` retries.
                slot.set_state("stopping", time.monotonic(), f"retired, but pid {slot.pid} on {slot.node} "
                                                             "could not be confirmed dead")
                self.log.action("remove", slot.id, slot.role, "failed", slot.error)
                return False
            slot.set_state("exited", time.monotonic())
            await self.fleet.remove_secrets([slot])
            self.fleet.slots.pop(slot.id, None)
            await self._push_workers()
            self.fleet.note(f"{slot.id}: drained and stopped ({action.reason})")
            self.log.action("remove", slot.id, slot.role, "ok")
            return True
        finally:
            self.in_progress.discard(slot.id)

    async def _drain(self, slot: ProcessSlot, reason: str) -> None:
        """Stop routing to it, then wait (stop_s at most) until it holds no request."""
        started = time.monotonic()
        slot.set_state("draining", started)
        self.fleet.note(f"{slot.id}: draining ({reason})")
        await self._push_workers()  # frontends route only to "ready" workers
        await self._send(slot.id, Command("drain"))
        deadline = started + self.deadlines.stop_s
        fresh_after = started + self.deadlines.heartbeat_interval_s  # a heartbeat sent after the drain
        while time.monotonic() < deadline:
            heard = slot.last_heard or 0.0
            m = slot.metrics
            if heard > fresh_after and not (m.get("in_flight", 0) or m.get("num_running", 0)
                                            or m.get("num_waiting", 0)):
                return
            if slot.state != "draining":
                return  # failed meanwhile: the health loop owns it now
            await asyncio.sleep(0.1)
        self.fleet.note(f"{slot.id}: still busy after {self.deadlines.stop_s:.0f} s of draining; stopping it "
                        "(the worker fails what is left, and the frontend migrates it)")

    async def _wait_exit(self, slot: ProcessSlot, timeout_s: float | None = None) -> bool:
        deadline = time.monotonic() + (self.deadlines.stop_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            if slot.pid is None:
                return True
            try:
                if slot.pid not in await asyncio.wait_for(self.fleet.nodes.alive(slot.node, [slot.pid]), 15):
                    return True
            except Exception as exc:  # an unreachable node: keep trying until the deadline
                log.warning("cannot check pid %s on %s: %s", slot.pid, slot.node, exc)
            await asyncio.sleep(0.2)
        return False

    # ---- flip -------------------------------------------------------------------------------

    async def set_role(self, action: ScalingAction) -> bool:
        """Flip a ready worker's role in place (weights stay loaded; its requests finish).

        Where the engine cannot serve the new role (flips_in_place is False), the
        worker is drained and stopped and one of the new role launched instead.
        """
        slot = self.fleet.slots.get(action.worker_id or "")
        if slot is None or not action.role or slot.state != "ready" or slot.id in self.in_progress:
            self.log.action("set_role", action.worker_id or "", action.role or "", "skipped",
                            "not a ready worker")
            return False
        if not flips_in_place(self.recipe):
            reason = f"{action.reason}; {self.recipe.model.engine} workers cannot change role in place"
            self.fleet.note(f"{slot.id}: relaunching as {action.role} ({reason})")
            if not await self.remove(replace(action, kind="remove", role=slot.role, reason=reason)):
                return False
            return await self.add(replace(action, kind="add", worker_id=None, reason=reason)) is not None
        before = slot.role
        await self._send(slot.id, Command("set_role", {"role": action.role}))
        slot.role = action.role
        self.fleet.note(f"{slot.id}: role {before} -> {action.role} ({action.reason})")
        self.log.action("set_role", slot.id, action.role, "ok", f"from {before}")
        await self._push_workers()
        return True

    # ---- helpers ----------------------------------------------------------------------------

    def used(self) -> "Placement":
        """The running workers as a Placement (what place_one must not reuse)."""
        from dyn.topology.placement import Placement, WorkerPlacement

        workers = []
        for s in self.fleet.slots.values():
            if s.role == "frontend" or s.state == "exited":
                continue
            domain = self.topology.domain_of(s.node, s.gpus[0]) if s.gpus else None
            workers.append(WorkerPlacement(s.id, s.role, s.node, tuple(s.gpus), domain, s.cpu_threads))
        return Placement(tuple(workers), self.topology.head)

    def _pair_domain(self, role: str) -> str | None:
        """The NVLink domain holding most workers of the role `role` pairs with."""
        domains = Counter(self.topology.domain_of(s.node, s.gpus[0]) for s in self.fleet.slots.values()
                          if s.role in PAIRS.get(role, ()) and s.gpus and s.state not in GONE_STATES)
        domains.pop(None, None)
        return domains.most_common(1)[0][0] if domains else None


def flips_in_place(recipe: "Recipe") -> bool:
    """Whether a worker of `recipe` can take the other role without a restart.

    torch and mock workers start the shuttle's sender and receiver whatever
    their role (dyn.worker.process_startup.start_handoff). vLLM workers can
    when every group's engine serves either role (vllm_args.serves_either_role:
    NixlConnector kv_both, what dyn sets for disaggregated recipes), which is
    checked against the very arguments the workers are built from.
    """
    if recipe.model.engine != "vllm":
        return True
    from dyn.engine.vllm_args import engine_kwargs, serves_either_role

    disaggregated = recipe.mode == "disaggregated"
    return all(serves_either_role(engine_kwargs(recipe.model, group, device=device, disaggregated=disaggregated))
               for group in recipe.workers for device in ("cpu", "cuda"))
