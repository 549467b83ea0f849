"""ZMQ socket helpers: every plane opens its sockets here, so CURVE auth,
size limits and bad-message accounting live in one place.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from dyn.control.codec import MAX_MESSAGE_BYTES, Codec, Message
from dyn.control.keys import ProcessKeys
from dyn.errors import ProtocolError

log = logging.getLogger(__name__)


class Authorizer:
    """The set of client public keys a process's servers admit (ZAP callback)."""

    def __init__(self, public_keys: tuple[str, ...] | list[str] = ()) -> None:
        self._allowed: set[bytes] = {k.encode() for k in public_keys}
        self.num_denied = 0

    def add(self, public_keys: list[str] | tuple[str, ...]) -> None:
        self._allowed.update(k.encode() for k in public_keys)

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in self._allowed
        if not allowed:
            self.num_denied += 1
        return allowed


@dataclass
class ZapHandler:
    """The ZAP handler of one ZMQ context (a context has at most one): admits the CURVE clients
    its Authorizer lists."""

    authorizer: Authorizer = field(default_factory=Authorizer)
    _auth: AsyncioAuthenticator | None = None

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Start it (needs a running event loop); idempotent."""
        if self._auth is None:
            self._auth = AsyncioAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="dyn", credentials_provider=self.authorizer)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


@dataclass
class Security:
    """CURVE settings of one process; keys=None disables CURVE (recipe auth.curve: false)."""

    keys: ProcessKeys | None = None
    zap: ZapHandler = field(default_factory=ZapHandler)

    @classmethod
    def from_keys(cls, keys: ProcessKeys | None) -> "Security":
        return cls(keys=keys, zap=ZapHandler(Authorizer(keys.authorized if keys else ())))

    @property
    def authorizer(self) -> Authorizer:
        return self.zap.authorizer

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Start the ZAP handler (needs a running event loop); idempotent."""
        if self.keys is not None:
            self.zap.start(ctx)

    def stop(self) -> None:
        self.zap.stop()


def batch_io_context() -> zmq.asyncio.Context:
    """A ZMQ context whose I/O thread runs under SCHED_BATCH where the OS has it (Linux), for a
    process whose CPU work all runs on its event loop (the frontend, a mock worker).

    Every message sent wakes the I/O thread, which then preempts the event loop that woke it in
    the middle of its pass; under SCHED_BATCH it keeps its share of the CPU but is "mildly
    disfavored in wakeup decisions" (sched(7)): the loop finishes its pass and one wake-up carries
    its messages. Measured on 2 cores with the frontend and 2 mock workers saturated, streaming:
    +18% req/s, CPU per request -15% (frontend) and -26% (workers). Not for a worker whose engine
    computes on other threads of the process (torch, vLLM): there a message could wait behind
    them for a core."""
    ctx = zmq.asyncio.Context()
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        ctx.set(zmq.THREAD_SCHED_POLICY, policy)
    return ctx


@dataclass
class SharedContext:
    """One ZMQ context and its ZAP handler for the sockets of several workers in one process
    (mock workers hosted K to a process): one ZMQ I/O thread for them all instead of one each.
    Those threads took a third of a 72-worker host's CPU under streaming load; with one, the host's
    CPU per streamed request fell 12-19% (scripts/bench_vs_dynamo.py --before-dyn). Each worker
    keeps its own client keys; every process of a deployment binds with the same server keys and
    admits the same clients, so one handler admits for all of them."""

    ctx: zmq.asyncio.Context = field(default_factory=batch_io_context)
    zap: ZapHandler = field(default_factory=ZapHandler)

    def security(self, keys: ProcessKeys | None) -> Security:
        """A hosted worker's Security: its keys, the shared handler (admitting its clients too)."""
        if keys is not None:
            self.zap.authorizer.add(keys.authorized)
        return Security(keys=keys, zap=self.zap)

    def close(self) -> None:
        """After every worker on it has ended (a socket one left open is closed here, not waited for)."""
        self.zap.stop()
        self.ctx.destroy(linger=0)


def server_socket(ctx: zmq.asyncio.Context, kind: int, address: str, security: Security,
                  *, max_message_bytes: int = MAX_MESSAGE_BYTES, hwm: int = 10000) -> zmq.asyncio.Socket:
    """Bind a ROUTER/PUB/PULL socket; with keys, only authorized clients get through."""
    sock = ctx.socket(kind)
    _common(sock, max_message_bytes, hwm)
    if security.keys is not None:
        security.start(ctx)
        sock.curve_server = True
        sock.curve_secretkey = security.keys.server_secret.encode()
        sock.curve_publickey = security.keys.server_public.encode()
        sock.zap_domain = b"dyn"
    sock.bind(address)
    return sock


def client_socket(ctx: zmq.asyncio.Context, kind: int, address: str, security: Security,
                  *, identity: bytes | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                  hwm: int = 10000) -> zmq.asyncio.Socket:
    """Connect a DEALER/SUB/PUSH socket with this process's client key."""
    sock = ctx.socket(kind)
    _common(sock, max_message_bytes, hwm)
    if identity is not None:
        sock.identity = identity
    if security.keys is not None:
        sock.curve_serverkey = security.keys.server_public.encode()
        sock.curve_publickey = security.keys.public.encode()
        sock.curve_secretkey = security.keys.secret.encode()
    sock.connect(address)
    return sock


class BadMessages:
    """Counts dropped messages per kind and logs the first of each kind once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: Counter[str] = Counter()

    def record(self, error: ProtocolError | str) -> None:
        kind = str(error).split(":", 1)[0][:80]
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.warning("%s: dropped bad message (%s); further ones of this kind are only counted",
                        self.where, error)

    def record_failure(self, what: str, exc: Exception) -> None:
        """A message whose handling raised (a bug, dropped so the loop serves on): counted by
        kind, the first of each kind logged with its traceback."""
        kind = f"{what}: {type(exc).__name__}"[:80]
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.error("%s: handling %s failed; further ones of this kind are only counted", self.where, what,
                      exc_info=exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def decode_or_record(codec: Codec, data: bytes | memoryview, bad: BadMessages) -> Message | None:
    """Decode a frame, or count it as bad and return None (never raises)."""
    try:
        return codec.decode(data)
    except ProtocolError as exc:
        bad.record(exc)
        return None


class Routed(NamedTuple):
    """A message received on a ROUTER socket, with the identity to answer."""

    identity: bytes
    message: Message


async def receive_routed(sock: zmq.asyncio.Socket, codec: Codec, bad: BadMessages) -> Routed | None:
    """Receive one [identity, frame] message from a ROUTER socket.

    A wrong frame count or an undecodable frame is counted in `bad` and gives None (never
    raises on peer input). The frame is decoded in place (no copy of large payloads).
    """
    return routed_from_frames(await sock.recv_multipart(copy=False), codec, bad)


def routed_from_frames(frames: list[zmq.Frame], codec: Codec, bad: BadMessages) -> Routed | None:
    """[identity, frame] as a Routed message; None (counted in `bad`) for a wrong frame count or
    an undecodable frame. The frame is decoded in place (no copy of large payloads)."""
    if len(frames) != 2:
        bad.record(f"frame count: {len(frames)} frames")
        return None
    message = decode_or_record(codec, frames[1].buffer, bad)
    return None if message is None else Routed(frames[0].bytes, message)


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _common(sock: zmq.Socket, max_message_bytes: int, hwm: int) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
