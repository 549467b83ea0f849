"""The daemon as a local process: start it detached, find its pid, tell whether it lives.

The daemon runs on the head node, which this version requires to be the
machine running `dyn up` (`address: local`). It is started in its own
session through `sh ... &`, so it outlives the CLI and is never our child
(no zombie for us to reap); its pid is written next to the state.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from dyn.errors import LaunchError
from dyn.launch.local import pid_alive
from dyn.planner.state import StateStore, atomic_write

_START = 'setsid "$@" </dev/null >>"$DYN_DAEMON_LOG" 2>&1 &\necho $!'


def pid_path(store: StateStore) -> Path:
    return store.dir / "daemon.pid"


def start_local_daemon(store: StateStore, dyn_command: tuple[str, ...]) -> int:
    """Start `dyn planner --config <deployment.json>` detached; return its pid."""
    argv = ["sh", "-c", _START, "sh", *dyn_command, "planner", "--config", str(store.deployment_path)]
    env = {**os.environ, "DYN_DAEMON_LOG": str(store.daemon_log_path), "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
        pid = int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise LaunchError(f"could not start the planner daemon ({exc})", node="local", process="daemon") from None
    atomic_write(pid_path(store), str(pid))
    return pid


def daemon_pid(store: StateStore) -> int | None:
    """The pid of the latest daemon started (the pid file), else the one in the snapshot."""
    try:
        return int(pid_path(store).read_text().strip())
    except (OSError, ValueError):
        pass
    snapshot = store.load_snapshot()
    return snapshot.daemon.pid if snapshot is not None and snapshot.daemon is not None else None


def daemon_alive(store: StateStore) -> bool:
    pid = daemon_pid(store)
    return pid is not None and pid_alive(pid)


def kill_local(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
