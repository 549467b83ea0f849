"""Helpers shared by the launcher tests: nodes for test sshds, process reaping."""

from __future__ import annotations

import os
import signal

from sshd import SshdHandle

from dyn.config.topology import LOCAL_ADDRESS, Node, SshTarget
from dyn.launch.ssh import SshOptions

FAST = SshOptions(connect_timeout_s=5, retries=0, backoff_s=0.01, keepalive_s=5)


def ssh_node(handle: SshdHandle, known_hosts: str | None, name: str = "n1",
             identity_file: str | None = None) -> Node:
    return Node(name=name, rack="r0", ssh=handle.node_ssh(known_hosts, identity_file))


def local_node(name: str = "local") -> Node:
    return Node(name=name, rack="r0", ssh=SshTarget(address=LOCAL_ADDRESS))


def kill_groups(pids: list[int]) -> None:
    """Teardown: every test shares this machine, so kill what it started, by pgid."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
