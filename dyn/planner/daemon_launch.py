"""The daemon's hands on its processes: launch what is pending, fail and repair, stop everything.

A mixin of PlannerDaemon (dyn.planner.daemon): it runs on the daemon's loop
with the daemon's fleet, deadlines and stop flag.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from dyn.control.messages import Command
from dyn.errors import DynError
from dyn.planner.health import ProcessSlot
from dyn.planner.repair import mark_failed, repair
from dyn.planner.state import one_per_process

log = logging.getLogger("dyn.planner.daemon")
"""The daemon logs under one name, as before daemon.py was split."""

LAUNCH_CONCURRENCY = 8


def host_groups(slots: list[ProcessSlot], per_process: int) -> list[list[ProcessSlot]]:
    """One node's slots as processes to start: each frontend alone, workers `per_process` to a
    process in their order (recipe model.mock_workers_per_process; 1: a process each)."""
    workers = [s for s in slots if s.role != "frontend"]
    return ([[s] for s in slots if s.role == "frontend"]
            + [workers[i:i + per_process] for i in range(0, len(workers), max(1, per_process))])


class DaemonLaunching:
    """Launching, failing (relaunch through dyn.planner.repair) and stopping the fleet's processes."""

    # -- failures and relaunch (dyn.planner.repair) ----------------------------------------------

    def _fail(self, slot: ProcessSlot, reason: str, *, hung: bool = False) -> None:
        """`hung`: alive but past a deadline (its report then says where it was stuck)."""
        if mark_failed(self.fleet, slot, reason):
            self._spawn(repair(self.fleet, slot, self.deadlines, hung=hung,
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

        async def start(group: list[ProcessSlot]) -> None:
            async with gate:
                while sum(1 for s in self.fleet.slots.values() if s.state in ("launching", "starting")) >= limit:
                    await asyncio.sleep(0.05)
                    if self._stop.is_set():
                        return
                await self.fleet.launch(group[0], files_written=True, hosted=group[1:])

        # frontend first, then workers interleaved across nodes (every node starts early)
        prepared = await asyncio.gather(*(prepare(n, s) for n, s in by_node.items()))
        groups = [group for slots in prepared
                  for group in host_groups(slots, self._recipe.model.mock_workers_per_process)]
        order = sorted(groups, key=lambda g: (g[0].role != "frontend",
                                              [x.id for x in by_node[g[0].node]].index(g[0].id)))
        await asyncio.gather(*(start(g) for g in order), return_exceptions=True)

    async def _stop_everything(self) -> None:
        """Drain, stop, then SIGTERM and SIGKILL whatever is still alive; every step has a deadline.

        A process that has not registered yet cannot be told to stop and holds no request: it
        gets SIGTERM at once rather than after stop_s (a `dyn down` while models load)."""
        self.phase = "stopping"
        self._persist(force=True)
        unregistered = []
        for slot in self.fleet.slots.values():
            if slot.registered:
                await self._send(slot.id, Command("stop"))
            elif slot.is_active and slot.pid is not None:
                unregistered.append(slot)
            if slot.is_active:
                slot.set_state("stopping", time.monotonic())
        await asyncio.gather(*(self.fleet.kill(s, signal.SIGTERM) for s in one_per_process(unregistered)))
        deadline = time.monotonic() + self.deadlines.stop_s
        alive = await self._wait_gone(deadline)
        for sig, grace_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            if not alive:
                break
            await asyncio.gather(*(self.fleet.kill(s, sig) for s in one_per_process(alive)))
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
