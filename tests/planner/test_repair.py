"""repair(): a failed worker is killed for sure before it is relaunched; a cut-off node is waited out."""

from __future__ import annotations

import asyncio

from dyn.planner.health import Deadlines, ProcessSlot, RestartBudget
from dyn.planner.repair import mark_failed, repair


class CutOffFleet:
    """ensure_dead fails while the node is unreachable (`reachable_after` probes), then succeeds."""

    def __init__(self, slot: ProcessSlot, reachable_after: int) -> None:
        self.slots = {slot.id: slot}
        self.events: list[str] = []
        self.probes = 0
        self.reachable_after = reachable_after
        self.launched: list[int | None] = []

    def note(self, text: str) -> None:
        self.events.append(text)

    async def fetch_tail(self, slot: ProcessSlot, *, hung: bool = False) -> None:
        slot.log_tail = "(unreachable)"

    async def ensure_dead(self, slot: ProcessSlot, attempts: int = 3) -> bool:
        self.probes += 1
        return self.probes > self.reachable_after

    async def launch(self, slot: ProcessSlot) -> None:
        self.launched.append(slot.pid)
        slot.pid = 999
        slot.set_state("starting", 0.0)


def _slot() -> ProcessSlot:
    slot = ProcessSlot("worker-0", "both", "tray1", (0,), state="ready", pid=111, registered=True)
    slot.budget = RestartBudget(3, 600.0)
    slot.adopted_state = "ready"
    return slot


def test_partitioned_worker_is_replaced_only_once_its_node_answers():
    slot = _slot()
    fleet = CutOffFleet(slot, reachable_after=3)
    assert mark_failed(fleet, slot, "missed heartbeats for 3.1 s")  # type: ignore[arg-type]
    assert not mark_failed(fleet, slot, "again")  # type: ignore[arg-type]
    assert slot.state == "failed" and not slot.registered and slot.adopted_state is None
    asyncio.run(repair(fleet, slot, Deadlines(partition_s=30, restart_backoff_s=0),  # type: ignore[arg-type]
                       can_relaunch=lambda: True))
    assert fleet.probes == 4 and fleet.launched == [111]  # killed old pid 111 first, then relaunched
    assert slot.num_restarts == 1 and slot.state == "starting"
    assert any("unreachable; will kill and replace pid 111" in e for e in fleet.events)
    assert any("tray1 is back; old pid 111 killed" in e for e in fleet.events)


def test_a_node_cut_off_for_good_leaves_the_worker_down_not_doubled():
    slot = _slot()
    fleet = CutOffFleet(slot, reachable_after=10**6)
    mark_failed(fleet, slot, "missed heartbeats")  # type: ignore[arg-type]
    asyncio.run(repair(fleet, slot, Deadlines(partition_s=1.5, restart_backoff_s=0),  # type: ignore[arg-type]
                       can_relaunch=lambda: True))
    assert fleet.launched == [] and slot.state == "gave_up"
    assert "could not confirm pid 111 on tray1 is dead within 2 s" in slot.error


def test_no_relaunch_once_the_slot_was_retired_or_down_began():
    slot = _slot()
    fleet = CutOffFleet(slot, reachable_after=0)
    mark_failed(fleet, slot, "gone")  # type: ignore[arg-type]
    asyncio.run(repair(fleet, slot, Deadlines(restart_backoff_s=0), can_relaunch=lambda: False))  # type: ignore[arg-type]
    assert fleet.launched == [] and slot.state == "failed"
