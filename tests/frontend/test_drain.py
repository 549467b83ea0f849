"""A draining frontend sends clients elsewhere: its 503 closes the connection (a keep-alive
client's retry would otherwise come back over it), and it can stop listening on a shared port
while the connections it has are served on."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from dyn.frontend.app import start_site, stop_listening
from frontend_harness import MODEL, Harness, make_recipe

BODY = {"model": MODEL, "prompt": "hello there", "max_tokens": 2}


def test_a_draining_replica_answers_503_and_closes_the_connection():
    async def ask(url: str) -> tuple[int, dict, dict]:
        async with aiohttp.ClientSession() as session:  # keep-alive, as SDK clients are
            async with session.post(url, json=BODY) as r:
                return r.status, dict(r.headers), await r.json()

    with Harness(make_recipe(), [("w0", "both")]) as h:
        url = f"{h.base_url}/completions"
        status, headers, _ = asyncio.run(ask(url))
        assert status == 200 and headers.get("Connection", "keep-alive").lower() != "close"
        h.frontend.accepting = False
        status, headers, body = asyncio.run(ask(url))
        assert status == 503 and body["error"]["code"] == "draining"
        assert headers["Retry-After"] == "1" and headers["Connection"].lower() == "close"


def test_stop_listening_refuses_new_connections_and_serves_open_ones():
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_get("/", ok)
        runner, port = await start_site(app, "127.0.0.1", 0)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        try:
            async with session.get(f"http://127.0.0.1:{port}/") as r:
                assert await r.text() == "ok"
            await stop_listening(runner, port)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            async with session.get(f"http://127.0.0.1:{port}/") as r:  # the kept-alive connection
                assert await r.text() == "ok"
        finally:
            await session.close()
            await runner.cleanup()

    asyncio.run(main())
