"""The Runner protocol: what the launcher needs from a node, local or over SSH.

Commands are argv tuples; results are data. Two implementations exist
(`dyn.launch.local.LocalRunner`, `dyn.launch.ssh.SshRunner`); both build their
file and process operations from the same shell snippets (`dyn.launch.commands`)
so a node behaves the same whichever way it is reached.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dyn.config.topology import Node


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command. `exit_status` is 128+N when killed by signal N."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """A long-running process to start detached on a node."""

    name: str
    """Process id within the deployment, e.g. "decode-1", "frontend"."""
    argv: tuple[str, ...]
    """e.g. ("dyn", "worker", "--config", "/path/cfg.json"); argv[0] is looked up on PATH."""
    log_path: str
    """stdout and stderr are appended here; parent directories are created."""
    env: tuple[tuple[str, str], ...] = ()
    """Exported on top of the login environment of the node."""
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class LaunchedProcess:
    """A started process. `pid` is also its process-group and session id."""

    node: str
    name: str
    pid: int
    log_path: str


@runtime_checkable
class Runner(Protocol):
    """One node, reached locally or over SSH.

    Every method has a deadline; failures raise `dyn.errors.LaunchError`
    naming the node.
    """

    node: Node

    async def run(self, argv: Sequence[str], *, timeout_s: float = 30,
                  input: str | None = None) -> CommandResult:
        """Run argv to completion. A non-zero exit is a result, not an error;
        a timeout or a lost connection raises LaunchError."""
        ...

    async def put_text(self, text: str, remote_path: str, *, mode: int = 0o600) -> None:
        """Write `text` atomically with `mode`, creating parent directories (0700)."""
        ...

    async def read_tail(self, path: str, num_lines: int = 20) -> str:
        """The last lines of a file; "" when it does not exist."""
        ...

    async def start_detached(self, spec: ProcessSpec) -> LaunchedProcess:
        """Start `spec` in its own session so it outlives this runner; return
        at once. Raises LaunchError when argv[0] is not found on the node."""
        ...

    async def is_alive(self, pid: int) -> bool:
        """Whether `pid` runs on the node (a zombie does not)."""
        ...

    async def signal(self, pid: int, sig: int = signal.SIGTERM, *, group: bool = True) -> None:
        """Signal a process, or its whole group; no error when it is gone."""
        ...

    async def close(self) -> None:
        """Release the connection. Detached processes keep running."""
        ...
