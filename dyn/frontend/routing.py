"""The routing seam: which worker prefills and which decodes a prompt.

Loads come from the WorkerPool (the frontend's own in-flight counts merged
with the workers' heartbeat metrics); the decision itself is dyn.router's
Router (KV-aware cost, sessions, recipe policy). When the KV-event feed is
not wired, the router predicts each worker's cache from its own decisions.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from dyn.config.recipe import Recipe
from dyn.frontend.admission import Admission
from dyn.frontend.breaker import BreakerBoard
from dyn.frontend.protocol import ApiError, Hints
from dyn.frontend.workers import DECODE_ROLES, PREFILL_ROLES, WorkerHandle, WorkerPool
from dyn.kv.hashing import BlockHashCache
from dyn.router.errors import NoWorkerError
from dyn.router.router import Router
from dyn.router.types import RouteChoice, RouteHints, RouteRequest, WorkerLoad

RETRY_AFTER_S = 1.0


class Routing:
    """Chooses workers for a prompt; skips workers whose circuit breaker is open.

    `admission` (None: off) refuses new requests whose estimated TTFT on the
    chosen worker misses the target; re-sends of a started request skip it.
    """

    def __init__(self, recipe: Recipe, pool: WorkerPool, *, policy: str | None = None,
                 seed: int | None = None, breakers: BreakerBoard | None = None,
                 admission: Admission | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = recipe.mode
        self.block_size = recipe.model.block_size
        self.pool = pool
        self.router = Router(recipe.router, self.block_size, policy=policy, seed=seed)
        self.breakers = breakers or BreakerBoard(recipe.router.breaker_failures, recipe.router.breaker_cooldown_s)
        self.admission = admission
        self.clock = clock
        """The router's `now` (the simulator-equivalence test passes virtual time)."""
        self._load_cache: dict[str, tuple] = {}
        """Per worker: (handle, its metrics dict, in-flight counts, WorkerLoad built from them)."""
        self._hashes = BlockHashCache()
        """Block hashes of prefixes seen before (shared system prompts hash once)."""

    def choose_workers(self, prompt_token_ids: Sequence[int], hints: Hints, *,
                       exclude: frozenset[str] = frozenset(), salt: int = 0,
                       admit: bool = False, cached: bool = True) -> RouteChoice:
        """Pick (prefill or None, decode). Raises ApiError 503 when no worker can serve,
        429 when `admit` and the TTFT estimate misses the target. `cached=False`: the prompt
        runs whole wherever it goes (prompt_logprobs), so no worker's cache counts for it."""
        exclude = exclude | self.breakers.blocked(self.pool.workers)
        decode = self._loads(DECODE_ROLES, exclude)
        if not decode:
            raise ApiError("no decode worker is ready (or every one has its circuit breaker open after "
                           "repeated failures); retry later", status=503, code="no_workers",
                           type="service_unavailable", retry_after_s=RETRY_AFTER_S * 5)
        block_hashes = self._hashes.hash_blocks(prompt_token_ids, self.block_size, salt) if cached else []
        request = RouteRequest(block_hashes, len(prompt_token_ids), _route_hints(hints))
        prefill = self._loads(PREFILL_ROLES - {"both"}, exclude) if self.mode == "disaggregated" else []
        try:
            choice = self.router.route(request, prefill, decode, self.clock(),
                                       disaggregated=self.mode == "disaggregated")
        except NoWorkerError as err:
            raise ApiError(f"every worker is at its queue limit; retry later ({err})", status=503,
                           code="overloaded", type="service_unavailable",
                           retry_after_s=RETRY_AFTER_S) from None
        if admit and self.admission is not None:
            self._admit(choice, len(prompt_token_ids), hints.priority)
        for wid in (choice.prefill, choice.decode):
            if wid is not None:
                self.breakers.on_sent(wid)
        return choice

    def forget(self, worker_id: str) -> None:
        self.router.remove_worker(worker_id)
        self.breakers.forget(worker_id)

    def _admit(self, choice: RouteChoice, num_tokens: int, priority: int) -> None:
        handle = self.pool.workers[choice.prefill or choice.decode]
        uncached = num_tokens if choice.prefill else num_tokens - choice.overlap_blocks * self.block_size
        waiting = max(int(handle.metrics.get("waiting_prefill_tokens", 0)), handle.pending_prefill_tokens)
        self.admission.check(handle.id, handle.role, waiting, uncached, priority)  # type: ignore[union-attr]

    def _loads(self, roles: frozenset[str], exclude: frozenset[str]) -> list[WorkerLoad]:
        """The candidates' loads. A worker's load is rebuilt only when what it is made of changed
        (its heartbeat metrics, which the pool replaces and never edits, or the in-flight counts):
        with a rack's 72 workers, building every load for every request was most of the
        frontend's routing time."""
        loads, cache, bs = [], self._load_cache, self.block_size
        for h in self.pool.workers.values():
            if h.role not in roles or not h.is_ready or h.id in exclude:
                continue
            counts = (h.in_flight, h.peer_in_flight, h.in_flight_tokens, h.peer_in_flight_tokens,
                      h.role, h.nvlink_domain)
            hit = cache.get(h.id)
            if hit is None or hit[0] is not h or hit[1] is not h.metrics or hit[2] != counts:
                hit = cache[h.id] = (h, h.metrics, counts, _load(h, bs))
            loads.append(hit[3])
        if len(cache) > 2 * len(self.pool.workers) + 16:  # workers come and go: drop the departed
            for wid in [w for w in cache if w not in self.pool.workers]:
                del cache[wid]
        return loads


def _load(handle: WorkerHandle, block_size: int) -> WorkerLoad:
    m = handle.metrics
    # Our own in-flight count is fresher than the heartbeat; take whichever says busier.
    # Other frontend replicas' open requests (peer load) count as ours.
    in_flight = handle.in_flight + handle.peer_in_flight
    in_flight_tokens = handle.in_flight_tokens + handle.peer_in_flight_tokens
    running = max(int(m.get("num_running", 0)), min(in_flight, handle.limits.max_batch_size))
    return WorkerLoad(
        worker_id=handle.id, role=handle.role if handle.role in ("prefill", "decode") else "both",
        waiting_prefill_tokens=max(int(m.get("waiting_prefill_tokens", 0)), 0),
        active_decode_blocks=max(int(m.get("kv_blocks_used", 0)), in_flight_tokens // block_size, 0),
        num_running=running, num_waiting=handle.queue_depth, nvlink_domain=handle.nvlink_domain,
        kv_usage=min(max(m.get("kv_usage", 0.0), 0.0), 1.0),
        max_queue=handle.limits.max_queue, healthy=True,
        num_kv_blocks=max(int(m.get("kv_blocks_total", 0)), 0))


def _route_hints(hints: Hints) -> RouteHints:
    return RouteHints(priority=hints.priority, latency_sensitive=hints.latency_sensitive,
                      expected_output_tokens=hints.expected_output_tokens, session_id=hints.session_id,
                      session_ttl_s=hints.session_ttl_s)
