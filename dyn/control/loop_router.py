"""A bound ROUTER socket driven straight from the event loop, for a server's hot request path.

pyzmq's asyncio socket makes a future for every send and receive and re-checks the socket's
events after each one through loop callbacks; on a mock worker that was ~10% of the CPU per
request (py-spy). A ROUTER send never waits (without ROUTER_MANDATORY, a peer past its
high-water mark loses the message, as with the asyncio socket), so this class sends with
NOBLOCK at once and receives with NOBLOCK until the socket is empty, waiting on the socket's
file descriptor only when nothing is queued.

The descriptor signals that the socket's state may have changed, not that a message is there,
and any socket call (a send too) may take that signal: so a wait re-reads ZMQ_EVENTS first,
and sends made while a receive waits are followed, once per event-loop pass, by a look at
ZMQ_EVENTS that wakes the receive when messages are queued.

Sends and the ZMQ_EVENTS reads call pyzmq's backend socket (`zmq.backend.Socket`, the C
extension) with plain int flags: the Python layer above it (`zmq.Socket.send_multipart`,
`getsockopt`) checks each frame's type, combines enum flags in Python and wraps EVENTS in an
enum, which cost 4x the send itself (a send of a step's replies: 1.9 -> 0.4 us for 2 frames,
8.1 -> 1.7 us for 9).
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from dyn.control.codec import MAX_MESSAGE_BYTES, Codec
from dyn.control.sockets import BadMessages, Routed, Security, routed_from_frames, server_socket

log = logging.getLogger(__name__)

_send_frame = zmq.backend.Socket.send
_get_option = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


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
        self._look_scheduled = False
        """A look at ZMQ_EVENTS is due after this pass's sends (see send)."""
        self._aio.add_reader(self._fd, self._on_fd)
        self.sends_dropped = 0

    async def receive(self, codec: Codec, bad: BadMessages) -> Routed | None:
        """The next [identity, frame] message decoded (None: a bad one, counted in `bad`)."""
        sock = self._sock
        while True:
            # ZMQ_EVENTS first: a receive that finds nothing raises, which costs twice this look.
            if not _get_option(sock, _EVENTS) & _POLLIN:
                await self._wait_readable()
                continue
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            return routed_from_frames(frames, codec, bad)

    def send(self, identity: bytes, *frames: bytes) -> None:
        """Send replies now (never waits; a closed socket or a dropped peer is logged). Several
        frames go as one multipart message, which the peer's DEALER reads a frame at a time, each
        a message of its own: one send (and one wake-up of ZMQ's I/O thread) for a whole step's
        replies to one frontend."""
        sock = self._sock
        try:
            _send_frame(sock, identity, _MORE)
            for frame in frames[:-1]:
                _send_frame(sock, frame, _MORE)
            _send_frame(sock, frames[-1], _NOBLOCK)
        except zmq.ZMQError as exc:  # Again cannot happen on a ROUTER without ROUTER_MANDATORY
            self.sends_dropped += 1
            log.warning("reply not sent: %s", exc)
        if self._readable is not None and not self._look_scheduled:
            # The send may have taken the descriptor's signal for a message already queued: look
            # once after this pass (a burst of engine steps sends many times in one pass).
            self._look_scheduled = True
            self._aio.call_soon(self._look)

    def close(self, linger_ms: int = 500) -> None:
        if not self._sock.closed:
            self._aio.remove_reader(self._fd)
            self._sock.close(linger=linger_ms)
        if self._readable is not None and not self._readable.done():
            self._readable.cancel()

    async def _wait_readable(self) -> None:
        """Until the descriptor (or a look after a send) finds a message queued; the caller has
        just read ZMQ_EVENTS, which cleared the descriptor."""
        self._readable = self._aio.create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    def _on_fd(self) -> None:
        if self._sock.closed:
            return
        # Reading the events also clears the descriptor (else the loop would call back at once).
        if _get_option(self._sock, _EVENTS) & _POLLIN:
            waiter = self._readable
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _look(self) -> None:
        self._look_scheduled = False
        waiter = self._readable
        if waiter is not None and not waiter.done() and not self._sock.closed:
            if _get_option(self._sock, _EVENTS) & _POLLIN:
                waiter.set_result(None)  # a send took the descriptor's signal for a queued message
