"""The process side of the control plane: register, heartbeat, obey commands.

Used by workers and the frontend. The daemon answers every Heartbeat with a
RegisterAck; ok=False means it does not know us (it restarted), so we
register again — that is how a restarted daemon adopts running processes.
Silence from the daemon for longer than the grace period means it is gone
for good: `daemon_lost` is set and the process exits on its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Awaitable, Callable

import zmq
import zmq.asyncio

from dyn import __version__
from dyn.control.messages import CONTROL_CODEC, CliReply, CliRequest, Command, Heartbeat, Register, RegisterAck
from dyn.control.sockets import BadMessages, Security, client_socket, decode_or_record

log = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Awaitable[None]]
MetricsSource = Callable[[], Awaitable[tuple[dict[str, float], dict]]]


class ControlClient:
    def __init__(self, ctx: zmq.asyncio.Context, *, daemon_address: str, security: Security,
                 process_id: str, role: str, node: str, gpus: tuple[int, ...] = (),
                 heartbeat_interval_s: float = 1.0, daemon_grace_s: float = 30.0) -> None:
        self.process_id = process_id
        self.state = "starting"
        self.addresses: dict[str, str] = {}
        self.daemon_lost = asyncio.Event()
        self.bad = BadMessages(f"{process_id} control")
        self._register = Register(process_id=process_id, role=role, node=node, pid=_handle_pid(),
                                  version=__version__, gpus=list(gpus))
        self._interval_s = heartbeat_interval_s
        self._grace_s = daemon_grace_s
        self._sock = client_socket(ctx, zmq.DEALER, daemon_address, security,
                                   identity=process_id.encode())
        self._last_heard = time.monotonic()
        self._registered = False
        self._wake = asyncio.Event()
        self._replies: dict[str, asyncio.Future[CliReply]] = {}
        """Callers of ask() waiting, by the nonce the daemon echoes (a late reply finds no one)."""

    async def run(self, on_command: CommandHandler, metrics: MetricsSource) -> None:
        """Register, then heartbeat until cancelled or the daemon is lost."""
        receiver = asyncio.create_task(self._receive(on_command))
        try:
            while not self.daemon_lost.is_set():
                if not self._registered:
                    self._register.addresses = dict(self.addresses)
                    await self._sock.send(CONTROL_CODEC.encode(self._register))
                else:
                    values, info = await metrics()
                    await self._sock.send(CONTROL_CODEC.encode(
                        Heartbeat(process_id=self.process_id, state=self.state, metrics=values, info=info)))
                if time.monotonic() - self._last_heard > self._grace_s:
                    log.error("no word from the daemon for %.0f s; giving up", self._grace_s)
                    self.daemon_lost.set()
                    break
                self._wake.clear()
                await wait_event(self._wake, self._interval_s)
        finally:
            receiver.cancel()

    def set_state(self, state: str) -> None:
        """Change state and send a heartbeat right away."""
        self.state = state
        self._wake.set()

    async def ask(self, action: str, args: dict, timeout_s: float) -> CliReply | None:
        """One request to the daemon (e.g. weight_peers); None when it does not answer in time.
        Needs run() going, which receives the reply."""
        nonce = os.urandom(8).hex()
        future: asyncio.Future[CliReply] = asyncio.get_running_loop().create_future()
        self._replies[nonce] = future
        try:
            await self._sock.send(CONTROL_CODEC.encode(CliRequest(action=action, args={**args, "nonce": nonce})))
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return None
        finally:
            self._replies.pop(nonce, None)

    def close(self) -> None:
        self._sock.close(linger=200)

    async def _receive(self, on_command: CommandHandler) -> None:
        while True:
            data = await self._sock.recv()
            message = decode_or_record(CONTROL_CODEC, data, self.bad)
            if message is None:
                continue
            self._last_heard = time.monotonic()
            if isinstance(message, RegisterAck):
                was = self._registered
                self._registered = message.ok
                self._interval_s = message.heartbeat_interval_s or self._interval_s
                if not message.ok and was:
                    log.warning("daemon does not know us (%s); registering again", message.reason)
                    self._wake.set()
            elif isinstance(message, CliReply):
                waiting = self._replies.get(str(message.payload.get("nonce", "")))
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
            elif isinstance(message, Command):
                try:
                    await on_command(message)
                except Exception:
                    log.exception("command %s failed", message.action)
            else:
                self.bad.record(f"unexpected {type(message).__name__}")


class EssentialTasks:
    """The tasks a process cannot serve without (its request plane, its KV events). One that ends
    while the process is not stopping is logged with its error and sets `stop`: the process exits
    non-zero and the daemon relaunches it, instead of heartbeating on while deaf or blind."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.error = ""
        """Which task ended and why (empty: none did)."""

    def start(self, coro: Awaitable[None], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stop.is_set():
            return  # (stopping: tasks are cancelled or see their sockets close)
        exc = task.exception()
        self.error = f"{task.get_name()} stopped: {exc!r}" if exc else f"{task.get_name()} returned"
        log.error("%s; the process exits to be relaunched", self.error, exc_info=exc)
        self._stop.set()


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for an event at most timeout_s; unlike wait_for, never swallows a cancel."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
        return True
    except TimeoutError:
        return False


def _handle_pid() -> int:
    """The pid the daemon supervises this process by: our own, or that of the launcher
    client holding us (a Slurm step's srun on the head, see dyn.launch.slurm)."""
    handle = os.environ.get("DYN_REGISTER_PID", "")
    return int(handle) if handle.isdigit() else os.getpid()
