"""A ZMQ socket driven straight from the event loop: NOBLOCK calls, and a wait on the socket's
file descriptor only when a call would block.

pyzmq's asyncio socket makes a future for every send and receive and re-checks the socket's
events after each one through loop callbacks. Measured here (uvloop, a DEALER in ping-pong with
a ROUTER): 113-135 us of the client's CPU per round trip through it, 76 us this way. The hot
request plane (a worker's ROUTER, the frontend's DEALER per worker) takes this path; the rest of
dyn keeps pyzmq's asyncio sockets.

The descriptor signals that the socket's state may have changed, not that a message is there,
and any socket call (a send too) may take that signal: so a wait re-reads ZMQ_EVENTS first,
every read of ZMQ_EVENTS wakes the waiters whose event is there, and while someone waits every
other call is followed, once per event-loop pass, by such a read. A waiter also reads them
itself every SIGNAL_CHECK_S, and counts what it finds that way (a lost signal, not expected).

Calls go to pyzmq's backend socket (`zmq.backend.Socket`, the C extension) with plain int
flags: the Python layer above it (`zmq.Socket.send_multipart`, `getsockopt`) checks each
frame's type, combines enum flags in Python and wraps EVENTS in an enum, which cost 4x the send
itself (a send of a step's replies: 1.9 -> 0.4 us for 2 frames, 8.1 -> 1.7 us for 9).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq

log = logging.getLogger(__name__)

SIGNAL_CHECK_S = 0.5
"""A waiter looks at the events itself after this long: ZMQ's descriptor is edge-like and any call
may take its signal, so a missed wake-up would otherwise wait for the next, unrelated signal."""

_send_frame = zmq.backend.Socket.send
_get_option = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class _PlainContext(zmq.Context):
    _owner: object = None
    """The asyncio context this one shadows: a bare shadow does not keep it alive, and sockets on
    a shadow of a collected context fail with "Bad address"."""


def plain_context(ctx: zmq.Context) -> zmq.Context:
    """A plain (not asyncio) context on `ctx`'s ZMQ context, for LoopSockets; it and every socket
    made on it keep `ctx` alive."""
    shadow = _PlainContext.shadow(ctx.underlying)
    shadow._owner = ctx
    return shadow


class LoopSocket:
    """A plain (not asyncio) zmq.Socket on the running event loop; one owner per socket."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._aio = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._waiters: list[tuple[asyncio.Future, int]] = []
        self._look_scheduled = False
        """A look at ZMQ_EVENTS is due after this pass's calls (see touched)."""
        self.lost_signals = 0
        """Waits ended by the periodic check rather than the descriptor (0 unless a signal was lost)."""
        self._aio.add_reader(self._fd, self._look)

    def events(self) -> int:
        """ZMQ_EVENTS now. Reading them also clears the descriptor's signal, which may have been
        meant for someone else waiting (a receive while a send waits for room, or the other way
        round): so whoever's event is there is woken here, by every reader of the events."""
        ready = _get_option(self.sock, _EVENTS)
        if self._waiters:
            for waiter, event in self._waiters:
                if ready & event and not waiter.done():
                    waiter.set_result(None)
        return ready

    async def wait(self, event: int) -> None:
        """Until ZMQ_EVENTS has `event` (POLLIN or POLLOUT)."""
        while not self.events() & event:
            await self.park(event)

    async def park(self, event: int) -> None:
        """Until a look at the events finds `event` (or SIGNAL_CHECK_S passes: look again), for a
        caller that has just read them without it (try_recv returned None): not looking once
        more first saves a ZMQ_EVENTS read per wait, which costs as much as the receive. Nothing
        is missed: no call on the socket comes between that read and this wait, so a message
        that arrives meanwhile leaves the descriptor's signal for the look that wakes us."""
        waiter = self._aio.create_future()
        self._waiters.append((waiter, event))
        check = self._aio.call_later(SIGNAL_CHECK_S, self._check_signal, waiter, event)
        try:
            await waiter
        finally:
            check.cancel()
            if (waiter, event) in self._waiters:
                self._waiters.remove((waiter, event))

    async def recv(self, *, multipart: bool = False) -> Any:
        """The next frame (a multipart message's parts come one by one), or with multipart=True
        the next message's frames."""
        while True:
            got = self.try_recv(multipart=multipart)
            if got is not None:
                return got
            await self.park(_POLLIN)  # (try_recv has just looked; the look that wakes us saw POLLIN)

    def try_recv(self, *, multipart: bool = False) -> Any:
        """As recv, but None when nothing is queued (never waits)."""
        if not self.events() & _POLLIN:  # (a receive that finds nothing raises, which costs twice this look)
            return None
        try:
            got = (self.sock.recv_multipart(_NOBLOCK, copy=False) if multipart
                   else self.sock.recv(_NOBLOCK, copy=False))
        except zmq.Again:
            return None
        self.touched()
        return got

    def send_now(self, *frames: bytes) -> bool:
        """Send one message of these frames unless it would block (False). A ZMQ error other
        than a full queue (a closed socket) raises."""
        sock = self.sock
        try:
            for frame in frames[:-1]:
                _send_frame(sock, frame, _MORE)
            _send_frame(sock, frames[-1], _NOBLOCK)
        except zmq.Again:
            return False
        finally:
            self.touched()
        return True

    async def send(self, *frames: bytes) -> None:
        """Send one message, waiting while the peer's queue is full (its high-water mark)."""
        while not self.send_now(*frames):
            await self.wait(_POLLOUT)

    def touched(self) -> None:
        """After a call on the socket: it may have taken the descriptor's signal for an event
        someone waits on, so look once after this pass (a burst of calls looks once)."""
        if self._waiters and not self._look_scheduled:
            self._look_scheduled = True
            self._aio.call_soon(self._look)

    def close(self, linger_ms: int = 0) -> None:
        if not self.sock.closed:
            self._aio.remove_reader(self._fd)
            self.sock.close(linger=linger_ms)
        for waiter, _ in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

    def _check_signal(self, waiter: asyncio.Future, event: int) -> None:
        """A waiter still waiting after SIGNAL_CHECK_S: if its event is there, a signal was lost
        (counted, logged once); either way it is woken, and wait() looks and waits anew."""
        if waiter.done() or self.sock.closed:
            return
        if self.events() & event:  # (which wakes it)
            self.lost_signals += 1
            if self.lost_signals == 1:
                log.warning("ZMQ socket event found by the periodic check, not by its signal; "
                            "further ones are only counted (lost_signals)")
        else:
            waiter.set_result(None)

    def _look(self) -> None:
        """The descriptor fired, or a call may have taken its signal: read the events, which wakes
        whoever's event is there and clears the descriptor (else the loop would call back at once)."""
        self._look_scheduled = False
        if not self.sock.closed:
            self.events()
