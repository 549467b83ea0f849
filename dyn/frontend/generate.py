"""One request's trip through the workers: route, (remote prefill,) decode, stream back.

    client <- pieces <- Dispatcher.generate
                          | choose_workers -> (prefill | None, decode)      (admission: 429 here)
                          | prefill worker: GenerateRequest(prefill_only) -> TokenChunk(first), Finish(kv_offer)
                          | decode worker:  GenerateRequest(kv_source=offer, first_token) -> TokenChunks, Finish
                          '-> failed prefill / failed KV pull: plain request on the decode worker
                          '-> worker lost or stalled: re-route, re-send prompt + tokens already
                              streamed (a migration; greedy output is unchanged), up to
                              router.max_migrations; before the first token it is a retry with backoff

Here: where a request goes (route, remote prefill, fallback, retry, migration).
One worker's stream of a request (output limits, stall deadlines, cancel) is
dyn.frontend.worker_stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from contextlib import aclosing
from typing import AsyncIterator

from dyn.config.recipe import KvTiersSpec
from dyn.control.requests import Finish, GenerateRequest, RequestFailed
from dyn.engine.profile import EngineProfile
from dyn.frontend.agent import AgentTurns, AnswerMessage
from dyn.frontend.metrics import FrontendMetrics
from dyn.frontend.protocol import ApiError, GenerationRequest
from dyn.frontend.routing import RETRY_AFTER_S, Routing
from dyn.frontend.text import TextTokenizer
from dyn.frontend.worker_stream import Piece, Usage, WorkerFailed, WorkerStream
from dyn.frontend.workers import DECODE_ROLES, WORKER_GONE, WorkerPool

log = logging.getLogger(__name__)

MAX_RETRIES = 3
"""Re-sends of a request that failed before its first token (overloaded or lost worker)."""
RETRY_BACKOFF_S = 0.05
"""First retry's delay; doubles per retry, capped at 1 s."""
FALLBACK_PREFILL_TOKENS_PER_S = 500.0
"""Without a profile, the stall deadline of a first token allows this slow a prefill."""
UNMEASURED_RELAUNCH_S = 30.0
"""Relaunch time assumed before the daemon has measured one (a worker start on a loaded host)."""
MAX_RELAUNCH_WAIT_S = 600.0
"""Cap of the derived wait for a relaunching worker (a client's patience, not the worker's)."""
MAX_HOLD_S = 0.5
"""Longest a worker keeps a non-streaming request's tokens back (GenerateRequest.hold_s); a
quarter of router.stall_timeout_s when that is shorter, so a held answer never looks stalled."""
_RETRYABLE = frozenset({"overloaded", "worker_lost", WORKER_GONE, "internal", "kv_transfer"})
_LOST = frozenset({"worker_lost", WORKER_GONE})
_UNHEALTHY = frozenset({"worker_lost", "internal"})
"""Failures that count against a worker's circuit breaker (not overload, not bad input, not a
death the daemon already reported: the breaker is for workers that look ready but fail)."""


class Dispatcher:
    """Runs generation requests over the worker pool; shared by every HTTP request."""

    def __init__(self, pool: WorkerPool, routing: Routing, tokenizer: TextTokenizer,
                 metrics: FrontendMetrics, *, max_context: int, stall_timeout_s: float = 5.0,
                 max_migrations: int = 3, profile: EngineProfile | None = None,
                 log_prompts: bool = False, kv_tiers: KvTiersSpec | None = None,
                 relaunch_wait_s: float | None = None) -> None:
        self.pool = pool
        self.routing = routing
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_context = max_context
        self.stall_timeout_s = stall_timeout_s
        self.hold_s = min(MAX_HOLD_S, stall_timeout_s / 4)
        self.max_migrations = max_migrations
        self.relaunch_wait_s = relaunch_wait_s
        """router.relaunch_wait_s (None: derived from the daemon's measured relaunch time)."""
        self.profile = profile
        self.log_prompts = log_prompts
        self.kv_tiers = kv_tiers or KvTiersSpec()
        """Retention defaults for agent hints."""
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self.agent = AgentTurns(self)

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def generate(self, req: GenerationRequest, prompt_ids: list[int], request_id: str,
                 usage: Usage, *, salt: int = 0, answer_message: AnswerMessage | None = None) -> AsyncIterator[Piece]:
        """Stream pieces; the last one has finish_reason. Raises ApiError (503 full, 429 admission,
        502 when the workers failed it past the retry/migration limits). `answer_message`: the
        answer as the client will send it back next turn (see AgentTurns)."""
        return self._turn(_Run(self, req, prompt_ids, request_id, usage, salt).run(), req, prompt_ids,
                          usage, salt, answer_message)

    async def _turn(self, pieces: AsyncIterator[Piece], req: GenerationRequest, prompt_ids: list[int],
                    usage: Usage, salt: int, answer_message: AnswerMessage | None) -> AsyncIterator[Piece]:
        """The request's pieces; once it finished, the agent hints' post-turn actions."""
        async with aclosing(pieces) as run:
            async for piece in run:
                if piece.finish_reason:  # before the yield: a consumer stops at the last piece
                    self.agent.after_turn(req, prompt_ids, list(usage.token_ids), usage.decode_worker,
                                          salt, answer_message)
                yield piece

    def worker_wait_s(self) -> float:
        """How long a request may wait for a decode worker to become usable before failing.

        While a decode worker is relaunching, long enough for it to come back: 1.5x the slowest
        relaunch the daemon measured, plus the stall timeout for the failure to be noticed
        (router.relaunch_wait_s overrides). Otherwise the stall timeout: nothing is coming."""
        if not self.pool.is_recovering(DECODE_ROLES):
            return self.stall_timeout_s
        if self.relaunch_wait_s is not None:
            return max(self.relaunch_wait_s, self.stall_timeout_s)
        measured = self.pool.relaunch_s if self.pool.relaunch_s is not None else UNMEASURED_RELAUNCH_S
        return min(1.5 * measured + self.stall_timeout_s, MAX_RELAUNCH_WAIT_S)

    def expected_wait_s(self, worker_id: str, num_tokens: int, *, first: bool) -> float:
        """How long the next message of a stream may take on `worker_id` before it is a stall."""
        handle = self.pool.workers.get(worker_id)
        if first:
            waiting = num_tokens
            if handle is not None:
                waiting += max(int(handle.metrics.get("waiting_prefill_tokens", 0)),
                               handle.pending_prefill_tokens - num_tokens, 0)
            if self.profile is None:
                return self.stall_timeout_s + waiting / FALLBACK_PREFILL_TOKENS_PER_S
            role = self.profile.role(handle.role if handle else "decode")
            return self.stall_timeout_s + role.prompt_prefill_s(waiting)
        if self.profile is None or handle is None:
            return self.stall_timeout_s
        role = self.profile.role(handle.role)
        return self.stall_timeout_s + role.decode_step_s(role.max_batch_size, 0)


class _Run(WorkerStream):
    """One request: route it, run it (remote prefill + decode, or plain), recover from failures."""

    def __init__(self, d: Dispatcher, req: GenerationRequest, prompt_ids: list[int], rid: str,
                 usage: Usage, salt: int) -> None:
        super().__init__(d, req, prompt_ids, rid, usage, salt)
        self.tried: set[str] = set()
        self.num_lost = 0
        """Workers lost under this request before its first token (limit router.max_migrations)."""
        self._offer: dict | None = None

    async def run(self) -> AsyncIterator[Piece]:
        d, extra = self.d, {"request_id": self.rid}
        choice = await self._first_route()
        log.debug("request routed: prefill=%s decode=%s cached_blocks=%d", choice.prefill or "local",
                 choice.decode, choice.overlap_blocks, extra=extra)
        self.usage.decode_worker = choice.decode
        worker: str | None = choice.decode
        lost: RequestFailed | None = None
        if choice.prefill is not None:
            self.usage.prefill_worker = choice.prefill
            offer = None
            try:
                async with aclosing(self._remote_prefill(choice.prefill)) as pieces:
                    async for piece in pieces:
                        yield piece
                        if self.finish_reason:
                            return
                offer = self._offer
            except WorkerFailed as exc:
                self._note_failure(choice.prefill, exc.failure)
                log.warning("remote prefill on %s failed (%s); prefilling on %s", choice.prefill,
                            exc.failure.message, choice.decode, extra=extra)
            if offer is not None:
                d.metrics.prefilled["remote"].inc()
                try:
                    async with aclosing(self._decode(choice.decode, offer)) as pieces:
                        async for piece in pieces:
                            yield piece
                    return
                except WorkerFailed as exc:
                    failure = exc.failure
                    if failure.code not in _RETRYABLE:
                        raise _api_error(failure) from None
                    if failure.code != "kv_transfer":  # the decode worker itself is in trouble
                        await self._after_failure(choice.decode, failure)
                        worker, lost = None, failure
            d.metrics.prefilled["fallback"].inc()
        else:
            d.metrics.prefilled["local"].inc()
        async with aclosing(self._plain(worker, lost)) as pieces:
            async for piece in pieces:
                yield piece

    async def _first_route(self):
        """Route a new request; with no decode worker up (all relaunching), wait for one
        (`Dispatcher.worker_wait_s`) before answering 503."""
        d = self.d
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                return d.routing.choose_workers(self.prompt, self.req.hints, salt=self.salt, admit=True,
                                                cached=not self.scores_prompt)
            except ApiError as exc:
                if exc.code != "no_workers" or loop.time() - started >= d.worker_wait_s():
                    raise
            await asyncio.sleep(0.1)

    async def _remote_prefill(self, worker_id: str) -> AsyncIterator[Piece]:
        """The prompt on a prefill worker, its KV offered to a decode worker; a request of one token
        (a beam search step, lm-eval's scoring) ends there: a plain request, nothing exported (an
        offer nobody pulls would hold its blocks on the prefill worker until it times out)."""
        self._offer = None
        request = GenerateRequest(self.rid, self.prompt, self._sampling(), salt=self.salt,
                                  prefill_only=self.max_tokens != 1, **self._hint_fields())
        async with aclosing(self._follow(worker_id, request, self._prefilled)) as pieces:
            async for piece in pieces:
                yield piece

    def _prefilled(self, message: Finish) -> Piece | None:
        """A prefill worker's Finish: a stop at the first token ends the request; otherwise
        remember its KV offer for the decode worker."""
        if message.reason == "stop":
            return self._final("stop")
        if message.kv_offer is not None and self.emitted:
            self._offer = message.kv_offer
        return None

    async def _decode(self, worker_id: str, offer: dict) -> AsyncIterator[Piece]:
        request = GenerateRequest(self.rid, self.prompt, self._sampling(), salt=self.salt,
                                  kv_source=offer, first_token=self.emitted[0], hold_s=self._hold_s(),
                                  **self._hint_fields())
        async with aclosing(self._follow(worker_id, request)) as pieces:
            async for piece in pieces:
                yield piece

    async def _plain(self, worker_id: str | None, failure: RequestFailed | None = None) -> AsyncIterator[Piece]:
        """Prefill + decode on one worker; on a lost worker, continue on another."""
        while True:
            if worker_id is None:
                worker_id = await self._reroute(failure)
                if not self.emitted:  # a retry: back off, the failure may be load or a restart
                    self.d.metrics.retries.inc()
                    tries = self.usage.num_retries + self.num_lost
                    await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (tries - 1), 1.0))
            # Resume after what the client already has: same tokens under greedy decoding.
            request = GenerateRequest(self.rid, self.prompt + self.emitted,
                                      self._sampling(self.max_tokens - len(self.emitted)),
                                      salt=self.salt, resumed_tokens=len(self.emitted), hold_s=self._hold_s(),
                                      **self._hint_fields())
            try:
                async with aclosing(self._follow(worker_id, request)) as pieces:
                    async for piece in pieces:
                        yield piece
                return
            except WorkerFailed as exc:
                await self._after_failure(worker_id, exc.failure)
                worker_id, failure = None, exc.failure

    async def _after_failure(self, worker_id: str, failure: RequestFailed) -> None:
        """Count a failure against the retry/migration limits, raising ApiError past them."""
        d, usage, extra = self.d, self.usage, {"request_id": self.rid}
        self._note_failure(worker_id, failure)
        if failure.code not in _RETRYABLE or not failure.retryable:
            raise _api_error(failure)
        self.tried.add(worker_id)
        if self.emitted:
            usage.num_migrations += 1
            if usage.num_migrations > d.max_migrations:
                d.metrics.migration_failures.inc()
                raise ApiError(f"the request failed on {usage.num_migrations} workers after "
                               f"{len(self.emitted)} tokens and may migrate at most {d.max_migrations} "
                               f"times (router.max_migrations); last failure on {worker_id}: "
                               f"{failure.message}", status=502, code="migration_limit",
                               type="server_error")
            d.metrics.migrations.inc()
            log.warning("request migrating after %d tokens: %s", len(self.emitted), failure.message,
                        extra=extra)
            return
        if failure.code in _LOST:
            # Its worker died under it (or went silent): not this request's fault, and a relaunch
            # is on its way. Bounded by router.max_migrations, so a request that kills every
            # worker it lands on still ends.
            self.num_lost += 1
            if self.num_lost > d.max_migrations:
                raise _api_error(failure)
            log.info("request re-sent after losing worker %s before its first token (%d/%d)", worker_id,
                     self.num_lost, d.max_migrations, extra=extra)
            return
        usage.num_retries += 1
        if usage.num_retries > MAX_RETRIES:
            raise _api_error(failure)
        log.info("request retrying (%d/%d): %s", usage.num_retries, MAX_RETRIES, failure.message,
                 extra=extra)

    async def _reroute(self, failure: RequestFailed | None) -> str:
        """A worker to continue on. Before the first token: an untried one, else the last
        failure goes to the client. Mid-stream: an untried one first, then any ready one
        (a relaunched worker may reuse its id), waiting for one to come back
        (`Dispatcher.worker_wait_s`); then a clear error."""
        d = self.d
        loop = asyncio.get_running_loop()
        started = loop.time()
        context = self.prompt + self.emitted
        # A worker the daemon reported dead comes back (often under the same id): wait for it.
        # A silent one before the first token does not get a second try.
        lost = self.emitted or (failure is not None and failure.code == WORKER_GONE)
        passes = (frozenset(self.tried), frozenset()) if lost else (frozenset(self.tried),)
        while True:
            error: ApiError | None = None
            for exclude in passes:
                try:
                    worker = d.routing.choose_workers(context, self.req.hints, exclude=exclude,
                                                      salt=self.salt, cached=not self.scores_prompt).decode
                except ApiError as exc:
                    error = exc
                    continue
                self.usage.decode_worker = worker
                log.info("request re-routed to %s", worker, extra={"request_id": self.rid})
                return worker
            if not lost and failure is not None:
                raise _api_error(failure)  # no other worker: report the last refusal
            if loop.time() - started >= d.worker_wait_s():
                raise ApiError(f"no worker left to continue the request on after a failure "
                               f"(tried {sorted(self.tried)}; {error.message if error else ''})",
                               status=503, code="no_workers", type="service_unavailable",
                               retry_after_s=RETRY_AFTER_S)
            await asyncio.sleep(0.1)

    def _hint_fields(self) -> dict:
        """The request's agent hints as GenerateRequest fields (priority, retention, session)."""
        return hint_fields(self.req, self.d.routing.block_size, self.d.kv_tiers)

    def _hold_s(self) -> float:
        """How long the worker may keep this request's tokens back: a client that reads only the
        whole answer sees no difference (without stop strings, which are matched here as the
        text grows, so a worker can be stopped early), and the request costs a message or two
        instead of one per engine step on both ends."""
        return 0.0 if self.req.stream or self.req.sampling.stop else self.d.hold_s

    def _note_failure(self, worker_id: str, failure: RequestFailed) -> None:
        if failure.code in _UNHEALTHY:
            self.d.routing.breakers.on_failure(worker_id)



def hint_fields(req: GenerationRequest, block_size: int, tiers: KvTiersSpec) -> dict:
    """GenerateRequest fields carrying a request's priority, retention, session and LoRA adapter; a
    retention hint's missing priority / TTL take the recipe's kv_tiers defaults, priorities are capped."""
    hints = req.hints
    fields: dict = {"priority": hints.priority, "session_id": hints.session_id, "adapter": req.adapter}
    kept = hints.retention
    if kept is not None:
        priority = tiers.retention_priority if kept.priority is None else kept.priority
        fields.update(retention_priority=min(priority, tiers.max_retention_priority),
                      retention_ttl_s=tiers.retention_ttl_s if kept.ttl_s is None else kept.ttl_s,
                      retention_blocks=None if req.retain_tokens is None else req.retain_tokens // block_size)
    return fields


def _api_error(failure: RequestFailed) -> ApiError:
    if failure.code == "bad_request":
        return ApiError(failure.message, status=400, code="bad_request")
    if failure.code in _LOST:
        return ApiError(f"the worker was lost: {failure.message}", status=502, code="worker_lost",
                        type="server_error")
    if failure.code == "overloaded":
        return ApiError(f"workers are overloaded ({failure.message}); retry later", status=503,
                        code="overloaded", type="service_unavailable", retry_after_s=RETRY_AFTER_S)
    return ApiError(f"the worker failed the request: {failure.message}", status=502,
                    code=failure.code, type="server_error")
