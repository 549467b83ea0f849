"""In-flight load shared between frontend replicas (best effort).

Each replica routes with its own KV index (built from the workers' events, so
no shared state is needed for correctness), but a replica alone sees only its
own open requests; heartbeats tell every replica about the workers' queues
once a second. To close that gap each replica publishes, on a PUB socket, its
open requests per worker when they change (one message per `interval_s` at most),
and adds what its peers last published to its own counts. Replicas that share a port also
publish their open connections on it (dyn.frontend.balance spreads those).

A message is the sender's whole state, not a start/finish delta: a lost or
late message is corrected by the next one, and a peer that dies stops
counting after `expire_s` without any bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgpack
import zmq
import zmq.asyncio

from dyn.control.client import wait_event
from dyn.control.sockets import BadMessages, Security, client_socket, server_socket
from dyn.frontend.workers import WorkerPool

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.005
KEEPALIVE_S = 1.0
EXPIRE_S = 3.0


@dataclass
class _PeerState:
    """What a peer last published, and when it arrived."""

    at: float
    load: dict[str, tuple[int, int]]
    """{worker id: (in flight, prompt tokens)}"""
    url: str
    """The URL it shares with other replicas ("" if none)."""
    connections: int


class PeerLoad:
    """Publishes this replica's in-flight counts per worker; folds in its peers'."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, pool: WorkerPool, replica_id: str,
                 bind_host: str, *, interval_s: float = PUBLISH_INTERVAL_S, expire_s: float = EXPIRE_S) -> None:
        self._pool = pool
        self.replica_id = replica_id
        self._interval_s = interval_s
        self._expire_s = expire_s
        self._ctx = ctx
        self._security = security
        self._pub = server_socket(ctx, zmq.PUB, f"tcp://{bind_host}:*", security, hwm=100)
        self.address = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sub: zmq.asyncio.Socket | None = None
        self._peers: dict[str, str] = {}
        """peer replica id -> its PUB address."""
        self._seen: dict[str, _PeerState] = {}
        self._shared: tuple[str, int] = ("", 0)
        """This replica's shared url ("" if none) and its open connections there."""
        self.bad = BadMessages("frontend peer load")
        self.num_received = 0

    def update_peers(self, peers: dict[str, str]) -> None:
        """Follow exactly these peers ({replica id: PUB address}); this replica is skipped."""
        peers = {pid: addr for pid, addr in peers.items()
                 if pid != self.replica_id and addr.startswith("tcp://")}
        for pid, addr in list(self._peers.items()):
            if peers.get(pid) != addr:
                if self._sub is not None:
                    self._sub.disconnect(addr)
                del self._peers[pid]
                self._seen.pop(pid, None)
        for pid, addr in peers.items():
            if pid in self._peers:
                continue
            if self._sub is None:
                self._sub = client_socket(self._ctx, zmq.SUB, addr, self._security, hwm=1000)
                self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                self._sub.connect(addr)
            self._peers[pid] = addr
        self._apply()

    def set_connections(self, url: str, count: int) -> None:
        """This replica serves `url` together with the peers that publish the same one."""
        if (url, count) != self._shared:
            self._shared = (url, count)
            self._pool.load_changed.set()

    def peer_connections(self, url: str) -> list[int]:
        """Open connections of each live peer that shares `url`."""
        now = time.monotonic()
        return [p.connections for p in self._seen.values() if p.url == url and now - p.at <= self._expire_s]

    async def run(self) -> None:
        """Publish on change (and as a keepalive); apply what peers send."""
        await asyncio.gather(self._publish_loop(), self._receive_loop())

    async def _publish_loop(self) -> None:
        last: tuple | None = None
        last_sent = 0.0
        changed = self._pool.load_changed
        while True:
            await wait_event(changed, KEEPALIVE_S)  # (no task per wake-up, unlike wait_for)
            await asyncio.sleep(self._interval_s)  # batch the changes of a burst into one message
            changed.clear()
            if not self._peers:
                continue
            state = ({wid: (h.in_flight, h.in_flight_tokens) for wid, h in self._pool.workers.items()
                      if h.in_flight}, *self._shared)
            now = time.monotonic()
            if state != last or now - last_sent >= KEEPALIVE_S:
                try:
                    self._pub.send(msgpack.packb([self.replica_id, *state]), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # best effort: the next change or keepalive carries the same information
                last, last_sent = state, now

    async def _receive_loop(self) -> None:
        while True:
            if self._sub is None:
                await asyncio.sleep(0.1)
                continue
            frame = await self._sub.recv()
            try:
                peer, state, url, conns = msgpack.unpackb(frame, raw=False)
                parsed = {str(w): (int(v[0]), int(v[1])) for w, v in state.items()}
                url, conns = str(url), int(conns)
            except Exception as exc:  # any malformed frame: counted and dropped
                self.bad.record(f"bad peer load frame: {type(exc).__name__}")
                continue
            if peer in self._peers:
                self._seen[peer] = _PeerState(time.monotonic(), parsed, url, conns)
                self.num_received += 1
                self._apply()

    def _apply(self) -> None:
        """Set every worker's peer counts to the sum over live peers."""
        now = time.monotonic()
        totals: dict[str, list[int]] = {}
        for peer, seen in list(self._seen.items()):
            if now - seen.at > self._expire_s:
                del self._seen[peer]
                continue
            for wid, (n, tokens) in seen.load.items():
                t = totals.setdefault(wid, [0, 0])
                t[0] += n
                t[1] += tokens
        for wid, handle in self._pool.workers.items():
            n, tokens = totals.get(wid, (0, 0))
            handle.peer_in_flight, handle.peer_in_flight_tokens = n, tokens

    def close(self) -> None:
        self._pub.close(linger=0)
        if self._sub is not None:
            self._sub.close(linger=0)
