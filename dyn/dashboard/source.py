"""Where `dyn top` gets its numbers: the daemon's detailed status, and the frontend's /metrics.

The daemon's reply carries every process with its full heartbeat metrics.
Latency percentiles need the frontend's histograms, scraped from the URL the
frontend registered (`addresses["metrics"]`); when it cannot be reached the
dashboard shows "-" for them rather than stalling.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dyn.dashboard.history import Buckets, buckets_from_samples
from dyn.dashboard.view import FrontendSample
from dyn.deploy.client import DaemonUnreachable, request
from dyn.deploy.inspect import status_async
from dyn.planner.state import StateStore

TTFT_FAMILY = "dyn_frontend_ttft_seconds"
ITL_FAMILY = "dyn_frontend_itl_seconds"


class TopSource:
    """Polls one deployment; one instance per `dyn top` run (keeps the HTTP session)."""

    def __init__(self, name: str, *, timeout_s: float = 3.0, scrape_timeout_s: float = 1.0) -> None:
        self.store = StateStore(name)
        self.timeout_s = timeout_s
        self.scrape_timeout_s = scrape_timeout_s
        self.scrape_error = ""
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "TopSource":
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.scrape_timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def poll(self) -> tuple[dict[str, Any], FrontendSample | None]:
        try:
            payload = await request(self.store, "status", {"detail": True}, timeout_s=self.timeout_s)
        except DaemonUnreachable:
            payload = await status_async(self.store.name, timeout_s=0.5)
        return payload, await self._scrape(payload)

    async def log_tail(self, process_id: str, num_lines: int = 8) -> str:
        """The last lines of one process's log (over SSH for remote nodes), or why not."""
        from dyn.deploy.inspect import log_chunks
        from dyn.errors import DynError

        try:
            async with asyncio.timeout(self.timeout_s):
                async for chunk in log_chunks(self.store.name, process_id, num_lines=num_lines):
                    return chunk
        except (DynError, OSError, TimeoutError) as exc:
            return f"(log unavailable: {exc})"
        return ""

    async def _scrape(self, payload: Mapping[str, Any]) -> FrontendSample | None:
        url = next((w.get("addresses", {}).get("metrics") for w in payload.get("workers") or []
                    if w.get("role") == "frontend" and w.get("addresses", {}).get("metrics")), None)
        if not url or self._http is None:
            return None
        try:
            async with self._http.get(url) as response:
                text = await response.text()
            self.scrape_error = ""
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.scrape_error = f"frontend metrics at {url}: {exc or type(exc).__name__}"
            return None
        return parse_frontend_metrics(text)


def parse_frontend_metrics(text: str) -> FrontendSample:
    """TTFT and ITL histograms out of a Prometheus text exposition."""
    found: dict[str, Buckets] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in (TTFT_FAMILY, ITL_FAMILY):
                les = {float(s.labels["le"]): s.value for s in family.samples
                       if s.name.endswith("_bucket") and "le" in s.labels}
                if les:
                    found[family.name] = buckets_from_samples(les)
    except ValueError:
        return FrontendSample()
    return FrontendSample(ttft=found.get(TTFT_FAMILY), itl=found.get(ITL_FAMILY))
