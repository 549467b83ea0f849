"""LocalRunner: a node with `address: local`, driven through subprocesses.

It runs the same argv and shell snippets as the SSH runner, so a laptop
deployment exercises the launcher code paths a rack does.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Sequence

from dyn.config.topology import Node
from dyn.errors import LaunchError
from dyn.launch.runner import CommandResult
from dyn.launch.shell import ShellRunner

_NOT_FOUND_STATUS = 127


class LocalRunner(ShellRunner):
    """Runs commands on this machine; nothing to connect or close."""

    def __init__(self, node: Node, *, env: dict[str, str] | None = None) -> None:
        super().__init__(node)
        self._env = env
        """The environment of every command; None: this process's."""

    async def run(self, argv: Sequence[str], *, timeout_s: float = 30,
                  input: str | None = None) -> CommandResult:
        if not argv:
            raise LaunchError("empty command", node=self.node.name)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # so a timeout can kill the whole tree
                env=self._env,
            )
        except FileNotFoundError:
            # Mirror what a shell on an SSH node answers for a missing command.
            return CommandResult(_NOT_FOUND_STATUS, "", f"{argv[0]}: command not found\n")
        except PermissionError:
            return CommandResult(126, "", f"{argv[0]}: permission denied\n")
        data = input.encode() if input is not None else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            _kill_group(proc.pid)
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise LaunchError(f"command timed out after {timeout_s:g}s: {' '.join(argv)[:200]}",
                              node=self.node.name) from None
        code = proc.returncode if proc.returncode is not None else -1
        status = 128 - code if code < 0 else code
        return CommandResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

    async def close(self) -> None:
        return None


def pid_alive(pid: int) -> bool:
    """True when `pid` runs on this machine; a zombie counts as dead (it holds nothing but its
    exit status, so its ports, GPUs and shared memory are free)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def remove_files_of_dead_processes(directory: str, name: re.Pattern[str]) -> list[str]:
    """Unlink the files in `directory` whose name matches `name` and whose first group, the pid of
    the process that made them, is no longer running here: what a SIGKILLed process could not clean
    up (shared-memory rings, unix sockets). Returns the names removed."""
    removed = []
    for entry in os.listdir(directory):
        match = name.match(entry)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
            removed.append(entry)
        except (FileNotFoundError, PermissionError):  # gone meanwhile; another user's
            pass
    return removed


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
