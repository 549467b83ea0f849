"""The router: KV index + event tracking + predictions + a policy + sessions.

Driven by the live frontend and by the simulator alike: it does no I/O and
never reads the clock; every time-dependent call takes `now` (seconds, any
monotonic origin, non-decreasing).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Sequence

from dyn.config.recipe import RouterSpec
from dyn.router.errors import NoWorkerError, RouteInputError
from dyn.router.events import ApplyResult, KvEventBatch, KvEventTracker, KvSnapshot
from dyn.router.index import KvIndex, Overlaps
from dyn.router.policies import Policy, RouteContext, make_policy
from dyn.router.predictor import PrefixPredictor
from dyn.router.types import DisaggDecision, RouteChoice, RouteDecision, RouteRequest, WorkerLoad, WorkerRole

_log = logging.getLogger("dyn.router")


class Router:
    """Chooses workers for requests from what they cache and how loaded they are.

    Workers that publish KV events are tracked exactly (`apply_events`,
    `apply_snapshot`); for the others the router predicts their cache from its
    own decisions, for `prediction_ttl_s`. A worker's predictions are dropped
    as soon as its first event arrives.
    """

    def __init__(self, spec: RouterSpec, block_size: int, *, policy: str | None = None,
                 seed: int | None = None, prediction_ttl_s: float | None = None,
                 session_ttl_s: float | None = None, max_sessions: int = 100_000) -> None:
        if block_size <= 0:
            raise RouteInputError(f"must be > 0, got {block_size}", field="model.block_size")
        self.spec = spec
        self.block_size = block_size
        self.index = KvIndex()
        self.events = KvEventTracker(self.index)
        self.predictor = PrefixPredictor(spec.prediction_ttl_s if prediction_ttl_s is None
                                         else prediction_ttl_s)
        self.policy: Policy = make_policy(policy or spec.policy, spec, random.Random(seed))
        self.session_ttl_s = spec.session_ttl_s if session_ttl_s is None else session_ttl_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """session id -> (worker, expires at), least recently used first."""

    # ---- cache state ---------------------------------------------------

    def apply_events(self, batch: KvEventBatch) -> ApplyResult:
        """Apply a worker's event batch; `needs_snapshot` asks the caller to fetch one."""
        if not self.events.is_known(batch.worker_id):
            self.predictor.remove_worker(batch.worker_id)
        return self.events.apply_batch(batch)

    def apply_snapshot(self, snapshot: KvSnapshot) -> bool:
        """Replace a worker's contents (see KvEventTracker.apply_snapshot)."""
        self.predictor.remove_worker(snapshot.worker_id)
        return self.events.apply_snapshot(snapshot)

    def remove_worker(self, worker_id: str) -> None:
        """The worker died or left: forget its blocks, predictions and sessions."""
        self.events.remove_worker(worker_id)
        self.predictor.remove_worker(worker_id)
        for session_id in [s for s, (w, _) in self._sessions.items() if w == worker_id]:
            del self._sessions[session_id]

    def end_session(self, session_id: str) -> str | None:
        """The session closed: forget its worker (returned, if it had one)."""
        entry = self._sessions.pop(session_id, None)
        return entry[0] if entry else None

    def find(self, block_hashes: Sequence[int], now: float) -> Overlaps:
        """Per worker, leading blocks held: from events, or predicted."""
        found = self.index.find(block_hashes)
        if not len(self.predictor):
            return found
        predicted = self.predictor.find(block_hashes, now)
        if not predicted.blocks:
            return found
        return Overlaps({**predicted.blocks, **found.blocks}, found.host_hits, found.disk_hits)

    # ---- routing -------------------------------------------------------

    def route(self, request: RouteRequest, prefill_candidates: Sequence[WorkerLoad],
              decode_candidates: Sequence[WorkerLoad], now: float, *, disaggregated: bool) -> RouteChoice:
        """The deployment-level choice, shared by the live frontend and the simulator.

        Disaggregated: `choose_disagg` (prefill candidates may go unused);
        aggregated: `choose` among the decode candidates, which prefill themselves.
        Raises NoWorkerError when no decode candidate can take the request.
        """
        if disaggregated:
            decision = self.choose_disagg(request, prefill_candidates, decode_candidates, now)
            prefill = decision.prefill.worker_id if decision.prefill else None
            return RouteChoice(prefill, decision.decode.worker_id, decision.decode.overlap_blocks)
        chosen = self.choose(request, decode_candidates, now)
        return RouteChoice(None, chosen.worker_id, chosen.overlap_blocks)

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerLoad], now: float,
               role: WorkerRole | None = None) -> RouteDecision:
        """Pick a worker for the request among `candidates` (filtered by health, queue, role).

        Raises NoWorkerError, with a reason per rejected worker, when none can take it.
        """
        eligible = _eligible(candidates, role)
        overlaps = self.find(request.block_hashes, now)
        decision = self._decide(request, eligible, overlaps, now, track_session=True)
        self._remember(decision.worker_id, request, now)
        return decision

    def choose_disagg(self, request: RouteRequest, prefill_candidates: Sequence[WorkerLoad],
                      decode_candidates: Sequence[WorkerLoad], now: float) -> DisaggDecision:
        """Pick the decode worker, then a prefill worker unless prefilling locally is cheap.

        Local prefill when the prompt tokens the decode worker lacks are at most
        `disagg_threshold_tokens`, or when no prefill worker is available. The prefill worker is
        taken from the decode worker's NVLink domain when one there can take the request (the
        hand-off then stays on NVLink), else from any domain.
        """
        overlaps = self.find(request.block_hashes, now)
        decode = self._decide(request, _eligible(decode_candidates, "decode"), overlaps, now,
                              track_session=True)
        self._remember(decode.worker_id, request, now)
        uncached = request.num_tokens - decode.overlap_blocks * self.block_size
        if uncached <= self.spec.disagg_threshold_tokens:
            return DisaggDecision(decode=decode, prefill=None)
        try:
            eligible = _eligible(prefill_candidates, "prefill")
        except NoWorkerError as err:
            _log.debug("no prefill worker (%s); prefilling on %s", err, decode.worker_id)
            return DisaggDecision(decode=decode, prefill=None)
        prefill = self._decide(request, _same_domain(eligible, decode_candidates, decode.worker_id), overlaps,
                               now, track_session=False)
        self._remember(prefill.worker_id, request, now)
        return DisaggDecision(decode=decode, prefill=prefill)

    def _decide(self, request: RouteRequest, eligible: list[WorkerLoad], overlaps: Overlaps,
                now: float, track_session: bool) -> RouteDecision:
        session_id = request.hints.session_id if track_session else None
        session_worker = self._session_worker(session_id, now) if session_id else None
        ctx = RouteContext(request, eligible, overlaps, self.block_size, session_worker,
                           self._cache_blocks)
        idx, scores, reason = self.policy.choose(ctx)
        worker_id = eligible[idx].worker_id
        if session_id:
            ttl = request.hints.session_ttl_s or self.session_ttl_s
            self._sessions[session_id] = (worker_id, now + ttl)
            self._sessions.move_to_end(session_id)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        decision = RouteDecision(worker_id=worker_id, overlap_blocks=overlaps.blocks.get(worker_id, 0),
                                 tier_hits=overlaps.tier_hits(worker_id), scores=scores,
                                 policy=self.policy.name, reason=reason)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("route %d tokens -> %s (%s, %s) overlap=%d/%d tiers=%s scores=%s",
                       request.num_tokens, worker_id, self.policy.name, reason,
                       decision.overlap_blocks, len(request.block_hashes), decision.tier_hits,
                       {w: round(s, 2) for w, s in scores.items()})
        return decision

    def _remember(self, worker_id: str, request: RouteRequest, now: float) -> None:
        if not self.events.is_known(worker_id) and request.block_hashes:
            self.predictor.record(worker_id, request.block_hashes, now)

    def _session_worker(self, session_id: str, now: float) -> str | None:
        sessions = self._sessions
        while sessions:  # least recently used first: stop at the first live one
            if next(iter(sessions.values()))[1] > now:
                break
            sessions.popitem(last=False)
        entry = sessions.get(session_id)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def _cache_blocks(self, worker_id: str) -> int:
        return sum(self.index.num_blocks(worker_id).values()) + self.predictor.num_blocks(worker_id)


def _eligible(candidates: Sequence[WorkerLoad], role: WorkerRole | None) -> list[WorkerLoad]:
    eligible: list[WorkerLoad] = []
    reasons: dict[str, str] = {}
    for w in candidates:
        if not w.healthy:
            reasons[w.worker_id] = "unhealthy"
        elif w.num_waiting >= w.max_queue:
            reasons[w.worker_id] = f"queue full ({w.num_waiting}/{w.max_queue} waiting)"
        elif role is not None and w.role not in (role, "both"):
            reasons[w.worker_id] = f"role {w.role}, need {role}"
        else:
            eligible.append(w)
    if not eligible:
        what = f"{role} worker" if role else "worker"
        raise NoWorkerError(f"no {what} can take the request ({len(candidates)} candidates)",
                            role=role, reasons=reasons)
    return eligible


def _same_domain(eligible: list[WorkerLoad], decode_candidates: Sequence[WorkerLoad],
                 decode_id: str) -> list[WorkerLoad]:
    """The eligible prefill workers in the decode worker's domain, or all when there are none."""
    domain = next((w.nvlink_domain for w in decode_candidates if w.worker_id == decode_id), None)
    if domain is None:
        return eligible
    same = [w for w in eligible if w.nvlink_domain == domain]
    return same or eligible
