"""A tiny /metrics endpoint: aiohttp on the node's bind address, an ephemeral port.

Each process owns one `MetricsServer` over its own `CollectorRegistry`. A
`refresh` coroutine runs before every scrape so collectors can read fresh
figures (engine stats live on the engine thread) without the request path
paying for metrics.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from dyn.errors import DynError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REFRESH_TIMEOUT_S = 5.0

Refresh = Callable[[], Awaitable[None]]


class MetricsServerError(DynError):
    """The metrics endpoint could not bind."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host, self.port, self.reason = host, port, reason
        super().__init__(f"cannot serve metrics on {host}:{port}: {reason} "
                         "(check the node's bind_address in the topology)")


class MetricsServer:
    """Serves one registry at http://<host>:<port>/metrics until closed."""

    def __init__(self, registry: CollectorRegistry, host: str, *, port: int = 0,
                 refresh: Refresh | None = None) -> None:
        self.registry = registry
        self.host = host
        self._port = port
        self._refresh = refresh
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.num_scrapes = 0
        self.num_refresh_failures = 0

    async def start(self) -> str:
        """Bind and serve; returns the scrape URL (what goes in Register.addresses["metrics"])."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise MetricsServerError(self.host, self._port, exc.strerror or str(exc)) from None
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/metrics"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "MetricsServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.Response:
        self.num_scrapes += 1
        if self._refresh is not None:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await self._refresh()
            except (TimeoutError, RuntimeError, OSError):
                # Serve the previous figures rather than fail the scrape; the counter says so.
                self.num_refresh_failures += 1
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE})
