"""Replicas that share a port shed keep-alive connections they hold beyond their share, so a
client's pool ends up spread evenly (SO_REUSEPORT alone keeps whatever split the hash gave)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from dyn.frontend.balance import ConnectionBalancer, excess_connections
from sshd import free_port

URL = "http://127.0.0.1:9000"
"""The URL the replicas serve together (what they publish their counts under)."""


@pytest.mark.parametrize("mine, peers, excess", [
    (5, [3], 1), (4, [4], 0), (5, [4], 0), (8, [0], 4), (0, [8], 0), (6, [1, 1], 3), (3, [], 0)])
def test_excess_is_what_lies_above_the_rounded_up_mean(mine, peers, excess):
    assert excess_connections(mine, peers) == excess


class _Board:
    """Every replica's published count (stands in for the peer-load channel)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def view(self, name: str) -> "_View":
        return _View(self, name)


class _View:
    def __init__(self, board: _Board, name: str) -> None:
        self.board, self.name = board, name

    def set_connections(self, url: str, count: int) -> None:
        self.board.counts[(self.name, url)] = count

    def peer_connections(self, url: str) -> list[int]:
        return [n for (name, u), n in self.board.counts.items() if u == url and name != self.name]


async def _replica(port: int, shares: _View, served: list[str], name: str):
    """A server on the common port whose responses follow its balancer, as the frontend's do."""
    balancer: ConnectionBalancer | None = None

    async def handle(request: web.Request) -> web.Response:
        served.append(name)
        response = web.Response(text=name)
        if balancer.should_close(request):
            response.force_close()
        return response

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    balancer = ConnectionBalancer(runner.server, URL, port, shares, interval_s=0.02)
    return runner, balancer


def test_a_keep_alive_pool_ends_up_even_over_two_replicas():
    async def main():
        port, board, served = free_port(), _Board(), []
        a = await _replica(port, board.view("a"), served, "a")
        b = await _replica(port, board.view("b"), served, "b")
        tasks = [asyncio.create_task(r[1].run()) for r in (a, b)]
        # 16 keep-alive connections: the kernel's hash rarely splits them 8/8 on its own
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16, force_close=False))
        try:
            async def client(requests: int) -> None:
                for _ in range(requests):
                    async with session.get(f"http://127.0.0.1:{port}/") as r:
                        assert r.status == 200
                        await r.read()

            await asyncio.gather(*(client(60) for _ in range(16)))
            # The last answers may still close a connection of a replica above its share (then 7/8 or
            # 7/9 open, and no request left to open a new one): a few more requests settle it.
            settle = 0
            while (a[1].open_connections(), b[1].open_connections()) != (8, 8) and settle < 50:
                await asyncio.gather(*(client(1) for _ in range(16)))
                await asyncio.sleep(0.05)
                settle += 1
            assert (a[1].open_connections(), b[1].open_connections()) == (8, 8)
            assert len(served) == 16 * (60 + settle)
        finally:
            await session.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for r in (a, b):
                await r[0].cleanup()

    asyncio.run(main())


class _Transport:
    def __init__(self, port: int) -> None:
        self.port = port

    def get_extra_info(self, name: str):
        return ("127.0.0.1", self.port) if name == "sockname" else None


class _Request:
    def __init__(self, port: int) -> None:
        self.transport = _Transport(port)


class _Server:
    connections = [object()] * 6


def test_only_the_excess_closes_and_only_on_the_common_port():
    board = _Board()
    board.view("peer").set_connections(URL, 2)
    board.view("elsewhere").set_connections("another host's url", 0)
    balancer = ConnectionBalancer(_Server(), URL, 9000, board.view("me"))
    balancer.rebalance()  # 6 here, 2 on the peer: 2 over the share of 4
    assert board.counts[("me", URL)] == 6
    assert not balancer.should_close(_Request(9001))  # the replica's own port: never
    assert [balancer.should_close(_Request(9000)) for _ in range(3)] == [True, True, False]
