"""`dyn up --wait`: keep the calling shell (an sbatch script, a tmux pane) until the deployment ends.

In an sbatch script the job lasts as long as the script: `dyn up --slurm
--wait` is the script's last line. While it holds, a daemon that dies is
started again (it adopts the running processes, as scripts/dyn-planner.service
does), at most once per `restart_every_s`. A stop request (the CLI turns
SIGTERM/SIGINT into `stop`: Slurm sends SIGTERM at the time limit, KillWait
seconds before SIGKILL) drains and removes the deployment with `dyn down`.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from dyn.planner.daemon_proc import daemon_alive, start_local_daemon
from dyn.planner.state import StateStore


class HoldResult(NamedTuple):
    name: str
    how: str
    """"down" (removed by `dyn down`), "stopped" (by a stop request), "ended" (the daemon stopped
    for good, e.g. its Slurm allocation ended), or "failed"."""
    detail: str
    num_daemon_restarts: int


def hold(name: str, stop: threading.Event, *, poll_s: float = 2.0, restart_every_s: float = 60.0,
         down_timeout_s: float = 30.0) -> HoldResult:
    """Block until the deployment is gone or `stop` is set (then take it down)."""
    from dyn.deploy.teardown import down

    store = StateStore(name)
    restarts, last_restart = 0, float("-inf")
    while True:
        if stop.wait(poll_s):
            down(name, timeout_s=down_timeout_s)
            return HoldResult(name, "stopped", "stop requested: drained and removed", restarts)
        if not store.exists():
            return HoldResult(name, "down", "removed by `dyn down`", restarts)
        if daemon_alive(store):
            continue
        snapshot = store.load_snapshot()
        if not store.exists():
            return HoldResult(name, "down", "removed by `dyn down`", restarts)
        phase = snapshot.phase if snapshot is not None else "unknown"
        if phase == "stopped" and _removed_within(store, stop, down_timeout_s):
            return HoldResult(name, "down", "removed by `dyn down`", restarts)
        if phase in ("running", "degraded") and time.monotonic() - last_restart >= restart_every_s:
            start_local_daemon(store, store.load_deployment().dyn_command)
            restarts, last_restart = restarts + 1, time.monotonic()
            continue
        how = "ended" if phase in ("ended", "stopped") else "failed"
        return HoldResult(name, how, f"daemon exited, phase {phase}" +
                          (f": {snapshot.error}" if snapshot is not None and snapshot.error else ""), restarts)


def _removed_within(store: StateStore, stop: threading.Event, timeout_s: float) -> bool:
    """A daemon that stopped every process and exited is most often `dyn down` at work, which
    removes the state only after it has cleaned up (leftover processes, Slurm steps): wait for
    that instead of calling the deployment ended (exit 1) in the gap."""
    deadline = time.monotonic() + timeout_s
    while store.exists():
        if time.monotonic() >= deadline or stop.wait(0.2):
            return not store.exists()
    return True
