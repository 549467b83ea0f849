"""Failed processes: make sure the old one is dead, then relaunch it within its restart budget.

A process that misses heartbeats may be hung, or alive on a node cut off from
the daemon (a network partition). Either way it is killed before anything
takes its place: a hung process must not hold its GPUs, and a cut-off worker
must never serve a request its frontend has already migrated elsewhere. So a
failed worker is never re-admitted; its node's SSH answers again -> the old
pid is killed -> a fresh process is launched (same id, node and GPUs).

    failed --(pid confirmed dead)--> relaunch (budget left) | gave_up (budget spent)
       \\--(node unreachable)--> retried every second for `partition_s` --> gave_up
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from dyn.planner.health import Deadlines, ProcessSlot

if TYPE_CHECKING:
    from dyn.planner.fleet import Fleet


def mark_failed(fleet: "Fleet", slot: ProcessSlot, reason: str) -> bool:
    """Record the failure; False when the slot was already down (nothing more to do)."""
    if slot.state in ("failed", "gave_up", "exited"):
        return False
    slot.set_state("failed", time.monotonic(), reason)
    slot.registered, slot.adopted_state = False, None
    fleet.note(f"{slot.id} on {slot.node} failed: {reason}")
    return True


async def repair(fleet: "Fleet", slot: ProcessSlot, deadlines: Deadlines, *,
                 can_relaunch: Callable[[], bool], hung: bool = False) -> None:
    """After `mark_failed`: fetch its log tail (`hung`: with where it was stuck), kill it for sure,
    relaunch within the budget."""
    await fleet.fetch_tail(slot, hung=hung)
    dead = await fleet.ensure_dead(slot)
    if not dead:
        dead = await _wait_reachable(fleet, slot, deadlines.partition_s, can_relaunch)
    if not can_relaunch() or slot.state != "failed":
        return
    now = time.monotonic()
    if not dead:
        slot.set_state("gave_up", now, f"could not confirm pid {slot.pid} on {slot.node} is dead within "
                                       f"{deadlines.partition_s:.0f} s; not relaunching over it")
        fleet.note(f"{slot.id}: {slot.error}")
        return
    if not slot.budget.can_restart(now):
        slot.set_state("gave_up", now)
        fleet.note(f"{slot.id}: restart budget spent ({slot.budget.max_restarts} per "
                   f"{slot.budget.window_s:.0f} s); leaving it down")
        return
    slot.budget.record(now)
    slot.num_restarts += 1
    await asyncio.sleep(deadlines.restart_backoff_s)
    # Still ours to relaunch? (the planner may have retired it, `down` may have begun)
    if can_relaunch() and fleet.slots.get(slot.id) is slot and slot.state == "failed":
        fleet.note(f"{slot.id}: relaunching on {slot.node} (restart {slot.num_restarts})")
        await fleet.launch(slot)


async def _wait_reachable(fleet: "Fleet", slot: ProcessSlot, limit_s: float,
                          keep_trying: Callable[[], bool], period_s: float = 1.0) -> bool:
    """Retry killing the old pid until its node answers (True) or `limit_s` passes (False)."""
    fleet.note(f"{slot.id}: {slot.node} unreachable; will kill and replace pid {slot.pid} when it is back")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and keep_trying():
        await asyncio.sleep(period_s)
        if await fleet.ensure_dead(slot, attempts=1):
            fleet.note(f"{slot.id}: {slot.node} is back; old pid {slot.pid} killed")
            return True
    return False
