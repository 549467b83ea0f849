"""What a (re)starting daemon takes over from the previous one.

After a daemon restart the slot set comes from the previous daemon's snapshot,
not from the recipe: the planner may have launched, retired or flipped workers
since `dyn up`, and adopting means supervising exactly what runs. Two daemons
must never supervise one deployment (both would relaunch "missing" processes),
so a live previous daemon is detected by pid and command line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dyn.launch.local import pid_alive
from dyn.planner.health import ProcessSlot

if TYPE_CHECKING:
    from dyn.planner.state import Snapshot
    from dyn.topology.placement import Placement


def worker_slots(placement: "Placement", previous: "Snapshot | None") -> list[ProcessSlot]:
    """The workers to supervise: the recipe's placement, or the set the previous daemon ran."""
    placed = {w.id: w for w in placement.workers}
    if previous is None or not any(r.role != "frontend" for r in previous.processes):
        return [ProcessSlot(w.id, w.role, w.node, tuple(w.gpus), cpu_threads=w.cpu_threads)
                for w in placement.workers]
    return [ProcessSlot(r.id, r.role, r.node, tuple(r.gpus),
                        cpu_threads=placed[r.id].cpu_threads if r.id in placed else None)
            for r in previous.processes if r.role != "frontend" and r.state != "exited"]


def live_daemon(previous: "Snapshot | None", head: str, name: str) -> int | None:
    """The pid of another daemon of deployment `name` still running on this (head) node, if any."""
    if previous is None or previous.daemon is None:
        return None
    pid = previous.daemon.pid
    if pid == os.getpid() or previous.daemon.node != head or not pid_alive(pid):
        return None
    return pid if _is_daemon(pid, name) else None


def _is_daemon(pid: int, name: str) -> bool:
    """Whether `pid` runs `dyn planner` for `name` (a reused pid is some other program)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"planner" in argv and any(name.encode() in a for a in argv)
