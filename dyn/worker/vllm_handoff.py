"""Disaggregated hand-off for vLLM workers: vLLM's KV connector moves the blocks, dyn carries the ticket.

    prefill worker (vLLM)                        decode worker (vLLM)
    prefill_only request (do_remote_decode)
    finishes -> kv_transfer_params  --kv_offer-->  GenerateRequest(kv_source={"vllm": params}, first_token)
                                                   add_remote_decode: vLLM's NixlConnector pulls the
               <====== NIXL (UCX; cpu buffer on CPU, VRAM on GPUs) ======  prompt blocks, then decodes

The same hooks as the shuttle hand-off (export / import_and_decode), so the
request server and the frontend need no vLLM-specific path. A failed block
load is recomputed by vLLM itself (kv_load_failure_policy=recompute); a pull
that never completes (vLLM retries a failed handshake without end, e.g. when
the prefill worker is gone) is given up after shuttle.pull_timeout_s and the
prompt prefilled here. Either way the request succeeds and a counter says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from dyn.control.requests import GenerateRequest
from dyn.errors import RequestError
from dyn.worker.engine_loop import EngineLoop
from dyn.worker.request_server import Stream, engine_request

log = logging.getLogger(__name__)

OFFER_KEY = "vllm"
"""kv_offer / kv_source key holding vLLM's kv_transfer_params."""


@dataclass(slots=True)
class VllmHandoffStats:
    offers: int = 0
    pulls: int = 0
    local_fallbacks: int = 0
    """kv_source without vLLM transfer parameters (a non-vLLM or newer prefill worker): prefilled here."""


class VllmHandoff:
    def __init__(self, loop: EngineLoop, *, pull_timeout_s: float = 30.0) -> None:
        self._loop = loop
        self._pull_timeout_s = pull_timeout_s
        self.stats = VllmHandoffStats()

    async def close(self) -> None:
        return None

    async def export(self, stream: Stream, _msg: GenerateRequest | None) -> None:
        """Prefill side: the finished request's transfer parameters become the kv_offer."""
        rid = stream.request_id
        params = await asyncio.wrap_future(self._loop.submit(lambda e: e.take_transfer_params(rid)))
        self.stats.offers += 1
        stream.kv_offer = {OFFER_KEY: params}

    async def import_and_decode(self, stream: Stream, msg: GenerateRequest) -> None:
        """Decode side: add the request with the prefill worker's transfer parameters."""
        if msg.first_token is None:
            raise RequestError("kv_source needs first_token", field="first_token")
        params = msg.kv_source.get(OFFER_KEY) if isinstance(msg.kv_source, dict) else None
        request = engine_request(msg)
        first = msg.first_token
        if not isinstance(params, dict):  # an offer we cannot read costs a local prefill, not the request
            log.warning("kv_source holds no vLLM transfer parameters; prefilling locally",
                        extra={"request_id": msg.request_id})
            self.stats.local_fallbacks += 1
            left = request.sampling.max_tokens
            local = dataclasses.replace(
                request, prompt_token_ids=[*request.prompt_token_ids, first],
                sampling=dataclasses.replace(request.sampling, max_tokens=None if left is None else max(1, left - 1)))
            await asyncio.wrap_future(self._loop.submit(lambda e: e.add_request(local)))
            return
        self.stats.pulls += 1
        timeout = self._pull_timeout_s
        await asyncio.wrap_future(self._loop.submit(lambda e: e.add_remote_decode(request, params, first, timeout)))
