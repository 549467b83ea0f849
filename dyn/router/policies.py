"""Routing policies: given eligible workers, their cached prefix and load, pick one.

`KvCostPolicy` is ours (recipe `policy: kv`). The rest are the other recipe
policies (round-robin, least-loaded, random) and baselines written from the
published descriptions of other routers, so the simulator can compare them
on the same trace and deployment:

    dynamo   cost = prefill_blocks_after_overlap * weight + active_decode_blocks,
             host hits credited 0.75 and disk 0.25 of a device hit
    sglang   least loaded when loads are imbalanced (max-min > 64 and
             max > 1.5 x min), else best prefix match if its match rate > 0.3,
             else the worker with the smallest cache
    llm-d    score = 3 * prefix + 2 * queue + 2 * kv-free, each in 0..1

A policy returns a `Choice`; scores are costs (lower wins) or scores (higher
wins) as `lower_is_better` says. Exact ties are broken at random (seeded), so
identical idle workers share load instead of the first one taking it all.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from dyn.config.recipe import RouterSpec
from dyn.router.errors import RouteInputError
from dyn.router.index import Overlaps
from dyn.router.types import RouteRequest, WorkerLoad


@dataclass(slots=True)
class RouteContext:
    request: RouteRequest
    candidates: Sequence[WorkerLoad]
    """Eligible (healthy, not full, right role) workers; never empty."""
    overlaps: Overlaps
    block_size: int
    session_worker: str | None = None
    cache_blocks: Callable[[str], int] | None = None
    """Blocks a worker holds in total (for sglang's smallest-cache fallback)."""

    @property
    def prompt_blocks(self) -> int:
        return -(-self.request.num_tokens // self.block_size)


class Choice(NamedTuple):
    idx: int
    """Index into ctx.candidates."""
    scores: dict[str, float]
    reason: str


class Policy(ABC):
    name: str = ""
    lower_is_better: bool = True

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @abstractmethod
    def choose(self, ctx: RouteContext) -> Choice:
        """Pick one of ctx.candidates; never raises for a non-empty list."""

    def _best(self, values: list[float], lower: bool | None = None,
              tie_break: list[float] | None = None) -> int:
        """Index of the best value; ties go to the lowest `tie_break`, then at random."""
        lower = self.lower_is_better if lower is None else lower
        if lower:
            best = min(values)
            limit = best + 1e-9 * max(1.0, abs(best))
            ties = [i for i, v in enumerate(values) if v <= limit]
        else:
            best = max(values)
            limit = best - 1e-9 * max(1.0, abs(best))
            ties = [i for i, v in enumerate(values) if v >= limit]
        if len(ties) > 1 and tie_break is not None:
            least = min(tie_break[i] for i in ties)
            ties = [i for i in ties if tie_break[i] == least]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def _softmax(self, costs: list[float], temperature: float) -> int:
        """Sample by exp(-normalised cost / T); costs are scaled to 0..1 first."""
        low, high = min(costs), max(costs)
        span = high - low or 1.0
        weights = [math.exp(-((c - low) / span) / temperature) for c in costs]
        return self.rng.choices(range(len(costs)), weights=weights)[0]


def _scores(ctx: RouteContext, values: list[float]) -> dict[str, float]:
    return {w.worker_id: v for w, v in zip(ctx.candidates, values)}


class KvCostPolicy(Policy):
    """Ours: estimated work in block-prefill units; lowest wins.

    cost = prefill_weight * (uncached blocks + host hits * (1 - host credit)
                             + disk hits * (1 - disk credit))
         + memory-pressure penalty (blocks that would not fit in the free pool)
         + (1 + urgency) * (queued prefill blocks + decode_weight * active decode blocks)

    urgency is 2 for latency_sensitive plus the priority (capped at 4): queued
    work reported by a worker is a lower bound (reports lag, routed requests
    are not in them yet), so urgent requests pay more for it and go to idle
    workers. decode_weight = 1 + E / (E + prompt) for E expected output
    tokens: a request that will decode for long cares about the decode batch
    it joins; a prefill-heavy one mostly about its prefix.
    """

    name = "kv"

    def __init__(self, rng: random.Random, spec: RouterSpec) -> None:
        super().__init__(rng)
        self.spec = spec

    def choose(self, ctx: RouteContext) -> Choice:
        spec, hints = self.spec, ctx.request.hints
        bs = ctx.block_size
        prompt_blocks = ctx.prompt_blocks
        host_miss, disk_miss = 1.0 - spec.host_hit_credit, 1.0 - spec.disk_hit_credit
        urgency = (2.0 if hints.latency_sensitive else 0.0) + min(max(hints.priority, 0), 4)
        load_weight = 1.0 + urgency
        out_tokens = hints.expected_output_tokens or 0
        decode_weight = 1.0 + out_tokens / (out_tokens + ctx.request.num_tokens or 1)
        out_blocks = -(-out_tokens // bs)
        blocks, host_hits, disk_hits = ctx.overlaps
        weight = spec.prefill_weight
        inv_bs = 1.0 / bs
        get = blocks.get
        costs: list[float] = []
        ids: list[str] = []
        pressure = False
        # Hot loop (one pass per candidate): keep it to attribute reads and arithmetic.
        for w in ctx.candidates:
            wid = w.worker_id
            ids.append(wid)
            costs.append(weight * (prompt_blocks - get(wid, 0)) + load_weight * (
                w.waiting_prefill_tokens * inv_bs + decode_weight * w.active_decode_blocks))
            pressure = pressure or w.num_kv_blocks > 0
        if host_hits or disk_hits:
            position = {wid: i for i, wid in enumerate(ids)}
            for hits, miss in ((host_hits, host_miss), (disk_hits, disk_miss)):
                for wid, count in hits.items():
                    if wid in position:
                        costs[position[wid]] += weight * count * miss
        if pressure:
            for i, w in enumerate(ctx.candidates):
                if w.num_kv_blocks:
                    free = w.num_kv_blocks * (1.0 - w.kv_usage)
                    overflow = prompt_blocks - get(w.worker_id, 0) + out_blocks - free
                    if overflow > 0:
                        costs[i] += 2.0 * weight * overflow
        # Priority requests break cost ties toward the worker with the fewest requests in it
        # (waiting first): the same cost, but less to wait behind.
        tie_break = ([w.num_waiting * 1e6 + w.num_running for w in ctx.candidates]
                     if hints.priority > 0 else None)
        best = (self._softmax(costs, spec.temperature) if spec.temperature > 0
                else self._best(costs, tie_break=tie_break))
        reason = "lowest cost" if spec.temperature <= 0 else f"softmax T={spec.temperature}"
        if ctx.session_worker is not None and ctx.candidates[best].worker_id != ctx.session_worker:
            best, reason = self._affinity(ctx, costs, best, reason)
        return Choice(best, dict(zip(ids, costs)), reason)

    def _affinity(self, ctx: RouteContext, costs: list[float], best: int, reason: str) -> tuple[int, str]:
        """Stay on the session's worker while its cost is within the slack of the best."""
        for idx, w in enumerate(ctx.candidates):
            if w.worker_id == ctx.session_worker:
                limit = min(costs) * (1.0 + self.spec.session_affinity_slack) + 1.0
                if costs[idx] <= limit:
                    return idx, "session affinity"
                return best, reason + " (session worker too loaded)"
        return best, reason + " (session worker unavailable)"


class DynamoCostPolicy(Policy):
    """Baseline: Dynamo's published KV router cost (lib/kv-router scheduling/selector.rs):

        logit = overlap_score_weight * potential prefill blocks + decode blocks

    where the potential prefill is the worker's queued prefill tokens plus the
    prompt's uncached tokens, in blocks (`prefill_weight` stands in for the weight).
    """

    name = "dynamo"

    def __init__(self, rng: random.Random, spec: RouterSpec) -> None:
        super().__init__(rng)
        self.spec = spec

    def choose(self, ctx: RouteContext) -> Choice:
        spec = self.spec
        costs = []
        for w in ctx.candidates:
            device, host, disk = ctx.overlaps.tier_hits(w.worker_id)
            credited = device + host * spec.host_hit_credit + disk * spec.disk_hit_credit
            queued = w.waiting_prefill_tokens / ctx.block_size
            costs.append((ctx.prompt_blocks - credited + queued) * spec.prefill_weight + w.active_decode_blocks)
        best = self._softmax(costs, spec.temperature) if spec.temperature > 0 else self._best(costs)
        return Choice(best, _scores(ctx, costs), "dynamo cost")


class SglangCachePolicy(Policy):
    """Baseline: SGLang's cache-aware router (balance when skewed, else prefix)."""

    name = "sglang"
    abs_threshold = 64
    rel_threshold = 1.5
    match_threshold = 0.3

    def choose(self, ctx: RouteContext) -> Choice:
        loads = [float(w.num_running + w.num_waiting) for w in ctx.candidates]
        low, high = min(loads), max(loads)
        if high - low > self.abs_threshold and high > self.rel_threshold * low:
            return Choice(self._best(loads, lower=True), _scores(ctx, loads), "imbalanced: least loaded")
        matched = [float(ctx.overlaps.blocks.get(w.worker_id, 0)) for w in ctx.candidates]
        tokens = max(ctx.request.num_tokens, 1)
        rates = [min(m * ctx.block_size / tokens, 1.0) for m in matched]
        if max(rates) > self.match_threshold:
            return Choice(self._best(rates, lower=False), _scores(ctx, rates), "best prefix match")
        sizes = [float(ctx.cache_blocks(w.worker_id)) if ctx.cache_blocks else 0.0
                 for w in ctx.candidates]
        return Choice(self._best(sizes, lower=True), _scores(ctx, sizes), "low match: smallest cache")


class LlmdWeightedPolicy(Policy):
    """Baseline: llm-d's weighted scorers (prefix 3, queue 2, KV use 2); highest wins."""

    name = "llm-d"
    lower_is_better = False
    weights = (3.0, 2.0, 2.0)

    def choose(self, ctx: RouteContext) -> Choice:
        queues = [w.num_waiting for w in ctx.candidates]
        q_low, q_high = min(queues), max(queues)
        total = max(ctx.prompt_blocks, 1)
        w_prefix, w_queue, w_kv = self.weights
        scores = []
        for w, q in zip(ctx.candidates, queues):
            prefix = ctx.overlaps.blocks.get(w.worker_id, 0) / total
            queue = 1.0 if q_high == q_low else (q_high - q) / (q_high - q_low)
            scores.append(w_prefix * prefix + w_queue * queue + w_kv * (1.0 - w.kv_usage))
        return Choice(self._best(scores), _scores(ctx, scores), "weighted scorers")


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._next = 0

    def choose(self, ctx: RouteContext) -> Choice:
        idx = self._next % len(ctx.candidates)
        self._next += 1
        return Choice(idx, {}, "round robin")


class LeastLoadedPolicy(Policy):
    """Fewest requests (running + waiting), then fewest queued prefill tokens."""

    name = "least-loaded"

    def choose(self, ctx: RouteContext) -> Choice:
        loads = [w.num_running + w.num_waiting + w.waiting_prefill_tokens / 1e9
                 for w in ctx.candidates]
        return Choice(self._best(loads), _scores(ctx, loads), "least loaded")


class RandomPolicy(Policy):
    name = "random"

    def choose(self, ctx: RouteContext) -> Choice:
        return Choice(self.rng.randrange(len(ctx.candidates)), {}, "random")


POLICY_NAMES = ("kv", "round-robin", "least-loaded", "random", "dynamo", "sglang", "llm-d")


def make_policy(name: str, spec: RouterSpec, rng: random.Random) -> Policy:
    """The policy called `name` (a recipe policy or a baseline in POLICY_NAMES)."""
    if name == "kv":
        return KvCostPolicy(rng, spec)
    if name == "dynamo":
        return DynamoCostPolicy(rng, spec)
    simple: dict[str, type[Policy]] = {
        "round-robin": RoundRobinPolicy, "least-loaded": LeastLoadedPolicy,
        "random": RandomPolicy, "sglang": SglangCachePolicy, "llm-d": LlmdWeightedPolicy}
    if name not in simple:
        raise RouteInputError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}",
                              field="router.policy")
    return simple[name](rng)
