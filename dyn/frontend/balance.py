"""Keeps keep-alive connections spread over the frontend replicas that share a port.

SO_REUSEPORT deals each new connection to one of the listening replicas by a hash of its
addresses, and a connection stays where it landed for as long as the client keeps it open. A
client with a small pool (an SDK, a load balancer's upstream pool) can therefore leave one replica
with most of its traffic: 8 connections over 2 replicas split 5/3 or worse 73% of the time, and a
relaunched replica gets nothing until clients reconnect. A replica that holds more than its share
of the port's connections answers that many requests with `Connection: close`; those clients
reconnect and the kernel deals again, which converges on an even split. Each replica's count
travels in its peer-load messages (dyn.frontend.peers).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from aiohttp import web

REBALANCE_INTERVAL_S = 0.1


class ConnectionShares(Protocol):
    """What the balancer needs from the peer-load channel."""

    def set_connections(self, url: str, count: int) -> None:
        """Publish this replica's open connections on the shared `url`."""

    def peer_connections(self, url: str) -> list[int]:
        """Open connections of each live peer replica that serves the same `url`."""


def excess_connections(mine: int, peers: list[int]) -> int:
    """How many of this replica's connections are over its share (ceil of the mean): 0 when even.

    The ceiling keeps an odd total stable (5/4 sheds nothing) and means at most one replica
    sheds for a given imbalance."""
    fair = math.ceil((mine + sum(peers)) / (1 + len(peers)))
    return max(0, mine - fair)


class ConnectionBalancer:
    """Decides which responses close their connection so the shared port's clients spread out."""

    def __init__(self, server: web.Server, url: str, port: int, shares: ConnectionShares,
                 interval_s: float = REBALANCE_INTERVAL_S) -> None:
        self._server = server
        self._url = url
        self._port = port
        self._shares = shares
        self._interval_s = interval_s
        self._to_close = 0

    def open_connections(self) -> int:
        """Every open connection of this replica (those on its own port, a few scrapes, included)."""
        return len(self._server.connections)

    def rebalance(self) -> None:
        """Publish this replica's count and set how many connections to shed before the next look."""
        mine = self.open_connections()
        self._shares.set_connections(self._url, mine)
        self._to_close = excess_connections(mine, self._shares.peer_connections(self._url))

    async def run(self) -> None:
        while True:
            self.rebalance()
            await asyncio.sleep(self._interval_s)

    def should_close(self, request: web.BaseRequest) -> bool:
        """True (once per connection over the share): answer `request` with Connection: close."""
        if self._to_close <= 0 or request.transport is None:
            return False
        sockname = request.transport.get_extra_info("sockname")
        if not sockname or sockname[1] != self._port:  # reached on the replica's own port
            return False
        self._to_close -= 1
        return True
