"""SSH runner (asyncssh) and `connect`, the one way to get a Runner for a node.

Connection failures are sorted into what an operator can act on: host
unreachable (retried with backoff), auth refused, host key unknown or
changed (never retried). Options are data; nothing is read from
~/.ssh/config, the topology is the only source of truth.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh

from dyn.config.topology import Node
from dyn.errors import LaunchError
from dyn.launch import known_hosts
from dyn.launch.local import LocalRunner
from dyn.launch.runner import CommandResult, Runner
from dyn.launch.shell import ShellRunner

_MAX_BACKOFF_S = 10.0


@dataclass(frozen=True, slots=True)
class SshOptions:
    """How to open SSH connections; the same for every node of a deployment."""

    connect_timeout_s: float = 10
    """Deadline for TCP connect + handshake + auth, per attempt."""
    retries: int = 3
    """Extra attempts after the first, only for unreachable / timed-out hosts."""
    backoff_s: float = 0.5
    """Wait before retry k is backoff_s * 2**(k-1), capped at 10 s."""
    accept_new_host_keys: bool = False
    """Trust and record hosts absent from known_hosts (never a changed key)."""
    keepalive_s: float = 15
    """Keepalive interval; 3 missed replies drop the connection."""

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")


async def connect(node: Node, options: SshOptions) -> Runner:
    """A Runner for `node`: a LocalRunner for `address: local`, else an SSH session."""
    if node.ssh.is_local:
        return LocalRunner(node)
    conn = await _open(node, options)
    return SshRunner(node, conn)


class SshRunner(ShellRunner):
    """A node reached over one asyncssh connection; one channel per command."""

    def __init__(self, node: Node, conn: asyncssh.SSHClientConnection) -> None:
        super().__init__(node)
        self._conn = conn

    @property
    def is_connected(self) -> bool:
        return not self._conn.is_closed()

    async def run(self, argv: Sequence[str], *, timeout_s: float = 30,
                  input: str | None = None) -> CommandResult:
        if not argv:
            raise LaunchError("empty command", node=self.node.name)
        command = shlex.join(argv)
        try:
            result = await self._conn.run(command, input=input, check=False, timeout=timeout_s,
                                          encoding="utf-8", errors="replace")
        except asyncssh.TimeoutError:
            raise LaunchError(f"command timed out after {timeout_s:g}s: {command[:200]}",
                              node=self.node.name) from None
        except (asyncssh.Error, OSError) as err:
            raise LaunchError(f"SSH connection to {_where(self.node)} lost while running "
                              f"{command[:100]}: {_reason(err)}", node=self.node.name) from None
        return CommandResult(_exit_status(result), str(result.stdout or ""), str(result.stderr or ""))

    async def close(self) -> None:
        self._conn.close()
        await self._conn.wait_closed()


async def _open(node: Node, options: SshOptions) -> asyncssh.SSHClientConnection:
    target = node.ssh
    host_file = known_hosts.known_hosts_path(target)
    try:
        known = known_hosts.load(host_file)
    except (OSError, ValueError) as err:
        raise LaunchError(f"cannot read known_hosts file {host_file}: {err}", node=node.name) from None
    is_known = known_hosts.has_entry(known, target.address, target.port)
    accept_new = options.accept_new_host_keys and not is_known
    kwargs: dict[str, object] = dict(
        port=target.port, username=_user(node), config=None,
        known_hosts=None if accept_new else known,
        connect_timeout=options.connect_timeout_s, login_timeout=options.connect_timeout_s,
        keepalive_interval=options.keepalive_s, keepalive_count_max=3,
        preferred_auth="publickey",
    )
    if target.identity_file:
        kwargs.update(client_keys=[_load_identity(node)], agent_path=None)
    delay_s = options.backoff_s
    for attempt in range(options.retries + 1):
        try:
            conn = await asyncio.wait_for(asyncssh.connect(target.address, **kwargs),
                                          options.connect_timeout_s + 1)
            break
        except asyncssh.PermissionDenied:
            identity = target.identity_file or "the default keys / agent"
            raise LaunchError(f"auth refused for {_where(node)} with identity {identity}: "
                              "check identity_file / authorized_keys", node=node.name) from None
        except asyncssh.HostKeyNotVerifiable:
            raise _host_key_error(node, host_file, is_known) from None
        except (OSError, TimeoutError, asyncssh.ConnectionLost) as err:
            if attempt == options.retries:
                raise LaunchError(
                    f"host unreachable: cannot connect to {_where(node)} after {attempt + 1} "
                    f"attempt(s): {_reason(err)}; check the address/port and that sshd runs there",
                    node=node.name) from None
        except asyncssh.Error as err:
            raise LaunchError(f"SSH to {_where(node)} failed: {_reason(err)}", node=node.name) from None
        await asyncio.sleep(min(delay_s, _MAX_BACKOFF_S))
        delay_s *= 2
    if accept_new:
        key = conn.get_server_host_key()
        assert key is not None, "asyncssh always has the server key after a handshake"
        try:
            known_hosts.record(host_file, target.address, target.port, key)
        except OSError as err:
            conn.close()
            raise LaunchError(f"cannot record the host key in {host_file}: {err}", node=node.name) from None
    return conn


def _load_identity(node: Node) -> asyncssh.SSHKey:
    path = os.path.expanduser(node.ssh.identity_file or "")
    try:
        return asyncssh.read_private_key(path)
    except FileNotFoundError:
        raise LaunchError(f"identity_file {path} does not exist: fix ssh.identity_file in the topology",
                          node=node.name) from None
    except OSError as err:
        raise LaunchError(f"cannot read identity_file {path}: {err.strerror}", node=node.name) from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as err:
        raise LaunchError(f"identity_file {path} is not a usable private key ({err}); "
                          "dyn needs an unencrypted key or one loaded in ssh-agent", node=node.name) from None


def _host_key_error(node: Node, host_file: str, is_known: bool) -> LaunchError:
    pattern = known_hosts.host_pattern(node.ssh.address, node.ssh.port)
    if is_known:
        return LaunchError(
            f"host key for {pattern} does NOT match {host_file}: the host was reinstalled or the "
            f"connection is intercepted; verify it, then remove the old line with "
            f"`ssh-keygen -R '{pattern}' -f {host_file}`", node=node.name)
    return LaunchError(
        f"unknown host key for {pattern}: it is not in {host_file}; verify the host and rerun "
        "with --accept-new-host-keys to record it, or add it with ssh-keyscan", node=node.name)


def _where(node: Node) -> str:
    return f"{_user(node)}@{node.ssh.address}:{node.ssh.port}"


def _user(node: Node) -> str:
    return node.ssh.user or getpass.getuser()


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError) and not str(err):
        return "timed out"
    return str(getattr(err, "strerror", None) or err) or type(err).__name__


def _exit_status(result: asyncssh.SSHCompletedProcess) -> int:
    if result.exit_status is not None and result.exit_status >= 0:
        return result.exit_status
    if result.exit_signal:
        try:
            return 128 + signal.Signals[f"SIG{result.exit_signal[0]}"].value
        except KeyError:
            pass
    return 255
