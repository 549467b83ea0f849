"""Disaggregated hand-off: a prefill worker offers a request's KV; a decode worker pulls it.

    prefill worker                          decode worker
    prefill_only request finishes
    export_kv -> ShuttleSender.offer  --->  GenerateRequest(kv_source=offer, first_token)
                                            begin_import -> missing blocks + pool views
               <=== shuttle (shm|tcp|nixl) ===  ShuttleReceiver.pull into the views
    on_release -> release_export            commit_import -> decoding continues

If the pull fails, the decode worker cancels the import and prefills locally
(prompt + first token), so the client still gets its answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from dyn.control.requests import GenerateRequest
from dyn.engine.backend import EngineRequest
from dyn.errors import DynError, RequestError, ShuttleError
from dyn.shuttle import OfferDescriptor, PathError, ShuttleReceiver, ShuttleSender
from dyn.worker.engine_loop import EngineLoop
from dyn.worker.kv_path import TopologyPaths
from dyn.worker.request_server import Stream, engine_request

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HandoffStats:
    offers: int = 0
    pulls: int = 0
    pull_failures: int = 0
    local_fallbacks: int = 0
    bytes_pulled: int = 0
    seconds_pulling: float = 0.0
    bytes_by_transport: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds_by_transport: dict[str, float] = dataclasses.field(default_factory=dict)


class KvHandoff:
    def __init__(self, loop: EngineLoop, *, sender: ShuttleSender | None, receiver: ShuttleReceiver | None,
                 pull_timeout_s: float = 30.0, paths: TopologyPaths | None = None) -> None:
        self._loop = loop
        self.sender = sender
        self.receiver = receiver
        self.paths = paths
        """Transport per offer from the topology path (None: the receiver's host-id rule)."""
        self._pull_timeout_s = pull_timeout_s
        self.stats = HandoffStats()

    async def close(self) -> None:
        if self.sender is not None:
            await self.sender.close()
        if self.receiver is not None:
            await self.receiver.close()

    def on_release(self, request_id: str, delivered: bool) -> None:
        """ShuttleSender callback: the offer was pulled (or expired); unpin its blocks."""
        self._loop.submit(lambda e: e.release_export(request_id))

    async def export(self, stream: Stream, _msg: GenerateRequest | None) -> None:
        """Prefill side, after the first token: pin the KV and describe where to pull it."""
        if self.sender is None:
            raise ShuttleError("this worker has no shuttle sender (role is not prefill)")
        rid = stream.request_id
        export = await asyncio.wrap_future(self._loop.submit(lambda e: e.export_kv(rid)))
        try:
            offer = self.sender.offer(rid, export.block_hashes, export.block_views)
        except DynError:
            self._loop.submit(lambda e: e.release_export(rid))
            raise
        self.stats.offers += 1
        stream.kv_offer = offer.descriptor.to_dict()

    async def import_and_decode(self, stream: Stream, msg: GenerateRequest) -> None:
        """Decode side: pull the offered blocks into the pool, then decode; prefill locally on failure."""
        request = engine_request(msg)
        rid = msg.request_id
        if msg.first_token is None:
            raise RequestError("kv_source needs first_token", field="first_token")
        try:
            offer = OfferDescriptor.from_dict(msg.kv_source)
        except DynError as exc:
            # An offer this worker cannot read (a sender of another dyn version mid-upgrade, a
            # damaged frame) costs a local prefill, never the request.
            self.stats.pull_failures += 1
            log.warning("KV offer unreadable (%s), prefilling locally", exc, extra={"request_id": rid})
            await self._prefill_locally(request, msg.first_token)
            return
        kv_import = await asyncio.wrap_future(
            self._loop.submit(lambda e: e.begin_import(request, list(offer.block_hashes))))
        try:
            if kv_import.missing_idx:
                if self.receiver is None:
                    raise ShuttleError("this worker has no shuttle receiver")
                self.stats.pulls += 1
                choice = self.paths.choice_for(offer) if self.paths is not None else None
                transfer = await self.receiver.pull(offer, kv_import.missing_idx, kv_import.dest_views,
                                                    self._pull_timeout_s,
                                                    transport=choice.transport if choice else None)
                self.stats.bytes_pulled += transfer.num_bytes
                self.stats.seconds_pulling += transfer.seconds
                by = self.stats.bytes_by_transport
                by[transfer.transport] = by.get(transfer.transport, 0) + transfer.num_bytes
                secs = self.stats.seconds_by_transport
                secs[transfer.transport] = secs.get(transfer.transport, 0.0) + transfer.seconds
        except (ShuttleError, PathError, asyncio.TimeoutError) as exc:
            self.stats.pull_failures += 1
            log.warning("KV pull failed, prefilling locally: %s", exc, extra={"request_id": rid})
            await asyncio.wrap_future(self._loop.submit(lambda e: e.cancel_import(rid)))
            await self._prefill_locally(request, msg.first_token)
            return
        await asyncio.wrap_future(self._loop.submit(lambda e: e.commit_import(rid, msg.first_token)))

    async def _prefill_locally(self, request: EngineRequest, first_token: int) -> None:
        """Continue after the already-streamed first token, as if the KV had arrived."""
        self.stats.local_fallbacks += 1
        sampling = dataclasses.replace(request.sampling, max_tokens=max(1, request.sampling.max_tokens - 1))
        local = dataclasses.replace(request, prompt_token_ids=[*request.prompt_token_ids, first_token],
                                    sampling=sampling)
        await asyncio.wrap_future(self._loop.submit(lambda e: e.add_request(local)))
