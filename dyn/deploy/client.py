"""The CLI's line to the daemon: one CliRequest, one CliReply, with a deadline.

The CLI connects a DEALER to the address the daemon published in the
snapshot, authenticated with the deployment's "cli" key (0600 in the state
dir). A daemon that does not answer in time is reported as unreachable.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import zmq
import zmq.asyncio

from dyn.control.keys import load_process_keys
from dyn.control.messages import CONTROL_CODEC, CliReply, CliRequest
from dyn.control.sockets import Security, client_socket
from dyn.errors import DeploymentError, ProtocolError
from dyn.launch.local import pid_alive
from dyn.planner.daemon_proc import daemon_pid
from dyn.planner.state import StateStore

LIVENESS_PERIOD_S = 0.1
"""How often a wait for the daemon's reply checks that its process still runs."""


class DaemonUnreachable(DeploymentError):
    """The daemon did not answer (dead, or its node unreachable)."""

    def __init__(self, name: str, address: str, reason: str) -> None:
        self.name = name
        self.address = address
        super().__init__(f"deployment {name!r}: daemon at {address or '(unknown address)'} {reason}")


async def request(store: StateStore, action: str, args: dict[str, Any] | None = None, *,
                  timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one CLI request to the deployment's daemon and return the reply payload."""
    snapshot = store.load_snapshot()
    if snapshot is None or snapshot.daemon is None:
        raise DaemonUnreachable(store.name, "", "has not published its address yet")
    address = snapshot.daemon.address
    pid = daemon_pid(store)
    if pid is not None and not pid_alive(pid):
        raise DaemonUnreachable(store.name, address, f"is not running (pid {pid} has exited)")
    keys = load_process_keys(store.cli_keys_path) if store.cli_keys_path.exists() else None
    ctx = zmq.asyncio.Context()
    sock = client_socket(ctx, zmq.DEALER, address, Security.from_keys(keys),
                         identity=f"cli-{os.getpid()}-{os.urandom(3).hex()}".encode())
    try:
        await sock.send(CONTROL_CODEC.encode(CliRequest(action=action, args=args or {})))
        data = await _reply(sock, store.name, address, action, pid, timeout_s)
        try:
            reply = CONTROL_CODEC.decode_as(data, CliReply)
        except ProtocolError as exc:
            raise DeploymentError(f"deployment {store.name!r}: bad reply from the daemon ({exc})") from None
    finally:
        sock.close(linger=0)
        ctx.term()
    if not reply.ok:
        raise DeploymentError(f"deployment {store.name!r}: daemon refused {action!r}: {reply.error}")
    return reply.payload


async def _reply(sock: zmq.asyncio.Socket, name: str, address: str, action: str, pid: int | None,
                 timeout_s: float) -> bytes:
    """The daemon's answer, or DaemonUnreachable at the deadline or as soon as its process exits."""
    receiving = asyncio.ensure_future(sock.recv())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise DaemonUnreachable(name, address, f"did not answer {action!r} within {timeout_s:g} s")
            done, _ = await asyncio.wait({receiving}, timeout=min(left, LIVENESS_PERIOD_S))
            if done:
                return receiving.result()
            if pid is not None and not pid_alive(pid):
                done, _ = await asyncio.wait({receiving}, timeout=LIVENESS_PERIOD_S)  # a reply sent as it exited
                if done:
                    return receiving.result()
                raise DaemonUnreachable(name, address, f"exited (pid {pid}) before answering {action!r}")
    finally:
        receiving.cancel()
