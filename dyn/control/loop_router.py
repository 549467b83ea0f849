"""A bound ROUTER socket driven straight from the event loop, for a server's hot request path.

A ROUTER send never waits (without ROUTER_MANDATORY, a peer past its high-water mark loses the
message, as with pyzmq's asyncio socket), so this class sends with NOBLOCK at once and receives
with NOBLOCK until the socket is empty, waiting on the socket's file descriptor only when
nothing is queued (dyn.control.loop_socket: on a mock worker pyzmq's asyncio futures were ~10%
of the CPU per request).
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from dyn.control.codec import MAX_MESSAGE_BYTES, Codec
from dyn.control.loop_socket import LoopSocket, plain_context
from dyn.control.sockets import BadMessages, Routed, Security, routed_from_frames, server_socket

log = logging.getLogger(__name__)


class LoopRouter:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, security: Security, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, hwm: int = 10000) -> None:
        security.start(ctx)  # CURVE's ZAP handler runs on the asyncio context
        sock = server_socket(plain_context(ctx), zmq.ROUTER, address, security,
                             max_message_bytes=max_message_bytes, hwm=hwm)
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop_sock = LoopSocket(sock)
        self.sends_dropped = 0

    async def receive(self, codec: Codec, bad: BadMessages) -> Routed | None:
        """The next [identity, frame] message decoded (None: a bad one, counted in `bad`)."""
        return routed_from_frames(await self._loop_sock.recv(multipart=True), codec, bad)

    def send(self, identity: bytes, *frames: bytes) -> None:
        """Send replies now (never waits; a closed socket or a dropped peer is logged). Several
        frames go as one multipart message, which the peer's DEALER reads a frame at a time, each
        a message of its own: one send (and one wake-up of ZMQ's I/O thread) for a whole step's
        replies to one frontend."""
        try:
            self._loop_sock.send_now(identity, *frames)  # (never False: a ROUTER drops, it does not block)
        except zmq.ZMQError as exc:
            self.sends_dropped += 1
            log.warning("reply not sent: %s", exc)

    def close(self, linger_ms: int = 500) -> None:
        self._loop_sock.close(linger_ms)
