"""ShellRunner: the Runner operations built on top of one `run` primitive.

Subclasses supply `run` and `close`; everything else goes through the shell
snippets in `dyn.launch.commands`, identical for local and SSH nodes.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence

from dyn.config.topology import Node
from dyn.errors import LaunchError
from dyn.launch import commands
from dyn.launch.runner import CommandResult, LaunchedProcess, ProcessSpec

_QUICK_TIMEOUT_S = 15.0
_TRANSFER_TIMEOUT_S = 60.0


class ShellRunner:
    """Base class; see `dyn.launch.runner.Runner` for the contract."""

    node: Node

    def __init__(self, node: Node) -> None:
        self.node = node

    async def run(self, argv: Sequence[str], *, timeout_s: float = 30,
                  input: str | None = None) -> CommandResult:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def put_text(self, text: str, remote_path: str, *, mode: int = 0o600) -> None:
        result = await self.run(commands.put_text_argv(remote_path, mode),
                                timeout_s=_TRANSFER_TIMEOUT_S, input=text)
        if not result.ok:
            raise LaunchError(f"cannot write {remote_path} (mode {mode:o}): {_why(result)}; "
                              "check the directory is writable by the SSH user",
                              node=self.node.name)

    async def read_tail(self, path: str, num_lines: int = 20) -> str:
        result = await self.run(commands.tail_argv(path, num_lines), timeout_s=_QUICK_TIMEOUT_S)
        if not result.ok:
            raise LaunchError(f"cannot read {path}: {_why(result)}", node=self.node.name)
        return result.stdout

    async def start_detached(self, spec: ProcessSpec) -> LaunchedProcess:
        try:
            argv = commands.detached_argv(spec)
        except ValueError as err:
            raise LaunchError(str(err), node=self.node.name, process=spec.name) from None
        result = await self.run(argv, timeout_s=_QUICK_TIMEOUT_S)
        if result.exit_status == commands.NOT_FOUND_STATUS:
            raise LaunchError(f"{spec.argv[0]!r} not found on PATH: install it on the node "
                              "or give its absolute path", node=self.node.name, process=spec.name)
        if not result.ok:
            raise LaunchError(f"could not start {spec.argv[0]!r}: {_why(result)}",
                              node=self.node.name, process=spec.name)
        try:
            pid = int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise LaunchError(f"start script printed no pid (stdout {result.stdout!r})",
                              node=self.node.name, process=spec.name) from None
        return LaunchedProcess(node=self.node.name, name=spec.name, pid=pid, log_path=spec.log_path)

    async def is_alive(self, pid: int) -> bool:
        result = await self.run(commands.is_alive_argv(pid), timeout_s=_QUICK_TIMEOUT_S)
        if result.exit_status not in (0, 1):
            raise LaunchError(f"cannot check pid {pid}: {_why(result)}", node=self.node.name)
        return result.ok

    async def signal(self, pid: int, sig: int = _signal.SIGTERM, *, group: bool = True) -> None:
        result = await self.run(commands.signal_argv(pid, sig, group=group), timeout_s=_QUICK_TIMEOUT_S)
        if not result.ok:
            what = "process group" if group else "process"
            raise LaunchError(f"cannot send {_signal.Signals(sig).name} to {what} {pid}: "
                              f"{_why(result)}; is it owned by another user?", node=self.node.name)


def _why(result: CommandResult) -> str:
    text = (result.stderr or result.stdout).strip()
    return f"exit {result.exit_status}" + (f": {text[-500:]}" if text else "")
