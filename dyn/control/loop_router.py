"""A bound ROUTER socket driven straight from the event loop, for a server's hot request path.

pyzmq's asyncio socket makes a future for every send and receive and re-checks the socket's
events after each one through loop callbacks; on a mock worker that was ~10% of the CPU per
request (py-spy). A ROUTER send never waits (without ROUTER_MANDATORY, a peer past its
high-water mark loses the message, as with the asyncio socket), so this class sends with
NOBLOCK at once and receives with NOBLOCK until the socket is empty, waiting on the socket's
file descriptor only when nothing is queued.

The descriptor signals that the socket's state may have changed, not that a message is there,
and any socket call (a send too) may take that signal: so a wait re-reads ZMQ_EVENTS first,
and a send wakes a waiting receiver when it finds messages queued.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from dyn.control.codec import MAX_MESSAGE_BYTES, Codec
from dyn.control.sockets import BadMessages, Routed, Security, routed_from_frames, server_socket

log = logging.getLogger(__name__)


class LoopRouter:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, security: Security, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, hwm: int = 10000) -> None:
        security.start(ctx)  # CURVE's ZAP handler runs on the asyncio context
        self._sock: zmq.Socket = server_socket(zmq.Context.shadow(ctx.underlying), zmq.ROUTER, address, security,
                                               max_message_bytes=max_message_bytes, hwm=hwm)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._aio = asyncio.get_running_loop()
        self._fd = self._sock.getsockopt(zmq.FD)
        self._readable: asyncio.Future | None = None
        self._aio.add_reader(self._fd, self._on_fd)
        self.sends_dropped = 0

    async def receive(self, codec: Codec, bad: BadMessages) -> Routed | None:
        """The next [identity, frame] message decoded (None: a bad one, counted in `bad`)."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait_readable()
                continue
            return routed_from_frames(frames, codec, bad)

    def send(self, identity: bytes, *frames: bytes) -> None:
        """Send replies now (never waits; a closed socket or a dropped peer is logged). Several
        frames go as one multipart message, which the peer's DEALER reads a frame at a time, each
        a message of its own: one send (and one wake-up of ZMQ's I/O thread) for a whole step's
        replies to one frontend."""
        try:
            self._sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again cannot happen on a ROUTER without ROUTER_MANDATORY
            self.sends_dropped += 1
            log.warning("reply not sent: %s", exc)
        waiter = self._readable
        if waiter is not None and not waiter.done() and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            waiter.set_result(None)  # the send took the descriptor's signal for a queued message

    def close(self, linger_ms: int = 500) -> None:
        if not self._sock.closed:
            self._aio.remove_reader(self._fd)
            self._sock.close(linger=linger_ms)
        if self._readable is not None and not self._readable.done():
            self._readable.cancel()

    async def _wait_readable(self) -> None:
        if self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        self._readable = self._aio.create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    def _on_fd(self) -> None:
        if self._sock.closed:
            return
        # Reading the events also clears the descriptor (else the loop would call back at once).
        if self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            waiter = self._readable
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
