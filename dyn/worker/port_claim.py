"""A port that another library binds later: claimed for this process, below the ephemeral range.

vLLM's NixlConnector binds its handshake side channel (VLLM_NIXL_SIDE_CHANNEL_PORT)
seconds after the worker names the port, from a thread; when that bind fails the
thread dies and the engine waits for it for good (a worker stuck "loading" until
its deadline). A port probed free with bind(0) is a port the kernel hands out
again: to the next worker's probe, to any ZeroMQ `tcp://host:0` or UCX listener,
to the local end of an outgoing connection. So the port comes from just below
the node's ephemeral range, where the kernel picks none, and is claimed with an
flock held open for the life of the process (the kernel drops it when the
process dies, SIGKILL included): two workers on a node, of any deployment,
never name the same one.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

from dyn.errors import LaunchError

NUM_PORTS = 1000
"""How far below the ephemeral range to look: one port per vLLM worker on the node."""


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The ports the kernel picks for bind(0) and outgoing connections (Linux's default without /proc)."""
    try:
        low, high = (int(v) for v in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def claim_port(host: str, *, lock_dir: str | None = None, below: int | None = None) -> int:
    """A port free on `host` that no other live process of this node has claimed; held until this
    process exits. `below`: the first port not to use (the ephemeral range's low end)."""
    lock_dir = lock_dir or tempfile.gettempdir()
    top = below if below is not None else ephemeral_range()[0]
    for port in range(top - 1, max(1023, top - 1 - NUM_PORTS), -1):
        fd = os.open(os.path.join(lock_dir, f"dyn-port-{port}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another live process holds it
            os.close(fd)
            continue
        if _bindable(host, port):
            return port  # fd stays open: the claim lasts as long as this process
        os.close(fd)  # something outside dyn listens there
    raise LaunchError(f"no free port on {host} in {top - NUM_PORTS}..{top - 1} (below the ephemeral "
                      f"range) for vLLM's NIXL side channel: {NUM_PORTS} are claimed or in use")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False
