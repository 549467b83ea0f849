"""`SloPolicy`: the SLO planner behind the daemon's ScalingPolicy seam.

Each call turns the heartbeats since the previous call into a `LoadWindow`
(deltas of the workers' cumulative counters), asks `SloPlanner.plan` for the
target counts, and turns the difference into actions with `scaling_actions`
(role flips first, then launches or drains). The simulator drives the same
planner and the same `scaling_actions` on virtual time; this is the live
clock's adapter.

Counters are cumulative per process; a relaunched process starts again from
zero, so a counter that went down counts from zero. On the first call after a
(re)start every process is only baselined: a restarted daemon must not read
hours of history as one interval's load.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dyn.config.scaling import domain_units, is_scaled, scale_to_topology
from dyn.engine.profile import EngineProfile, ProfileError, load_profile, mock_profile, profile_path
from dyn.planner.actions import COUNTED_STATES, counts_of, scaling_actions
from dyn.planner.policy import (Decision, LoadWindow, ScalingAction, ScalingPolicy, SloPlanner, StaticPolicy,
                                WorkerView)

if TYPE_CHECKING:
    from dyn.config.recipe import Recipe
    from dyn.config.topology import Topology

log = logging.getLogger(__name__)

_COUNTERS = ("requests_total", "num_computed_tokens", "num_generated_tokens", "prefix_hit_blocks",
             "rejected_total", "osl_requests_total", "osl_tokens_total")
"""osl_*: the frontend's count of requests with an expected-output-length hint and their sum."""
MAX_LATENCY_SAMPLES = 1000
"""Per window and metric: bucket counts are scaled down to at most this many samples."""


class PolicyChoice(NamedTuple):
    policy: ScalingPolicy
    note: str
    """Why this policy (shown by `dyn status`): the profile used, or why the planner is off."""


def choose_policy(recipe: "Recipe", topology: "Topology", recipe_source: str) -> PolicyChoice:
    """The recipe's planner when enabled and a profile exists; else fixed counts, saying why."""
    spec = recipe.planner
    if not spec.enabled:
        return PolicyChoice(StaticPolicy(), "planner disabled in the recipe: counts are fixed")
    path = profile_path(recipe_source) if recipe_source else None
    if path is not None and path.is_file():
        try:
            profile = load_profile(path, recipe)
        except ProfileError as exc:
            return PolicyChoice(StaticPolicy(), f"planner disabled: bad profile ({exc}); counts are fixed")
        source = str(path)
    elif recipe.model.engine == "mock":
        profile, source = mock_profile(recipe, topology), "the mock engine's timing model"
    else:
        where = path or Path(f"{recipe.name}.profile.json")
        return PolicyChoice(StaticPolicy(), f"planner disabled: no engine profile at {where} "
                                            "(run `dyn profile` on this recipe); counts are fixed")
    planner = slo_planner(recipe, topology, profile)
    disagg = recipe.mode == "disaggregated"
    return PolicyChoice(SloPolicy(planner, block_size=recipe.model.block_size, disaggregated=disagg,
                                  weights_source=recipe.weights.source),
                        f"SLO planner (TTFT {spec.ttft_ms:g} ms, ITL {spec.itl_ms:g} ms), profile: {source}")


MAX_STEP_DOWN = 2
"""Workers per role one scale-down decision may stop (per NVLink domain for per-domain recipes)."""


def slo_planner(recipe: "Recipe", topology: "Topology", profile: EngineProfile) -> SloPlanner:
    """The planner a deployment of `recipe` runs (the daemon's and the simulator's alike); its
    bounds are the recipe's scaled to `topology` (per-domain bounds x domains), and so is its
    largest scale-down step when the recipe counts per domain: 2 workers per domain per decision,
    else a 100-rack site sheds 2 of 2,000 workers every cooldown (measured: 100 minutes to
    fall from 1,200 to 800 decode workers)."""
    scaled = is_scaled(recipe)
    recipe = scale_to_topology(recipe, topology)
    spec = recipe.planner
    if recipe.mode != "disaggregated":  # aggregated: every worker is "both"; the planner sizes one pool
        spec = replace(spec, min_prefill=0, max_prefill=0)
    gpus = {("decode" if g.role == "both" else g.role): g.tp for g in recipe.workers}
    budget = topology.num_gpus or (spec.max_prefill + spec.max_decode) * max(gpus.values(), default=1)
    step = MAX_STEP_DOWN * (len(domain_units(topology)) if scaled else 1)
    return SloPlanner(spec, profile, gpus_per_worker=gpus, gpu_budget=budget, max_step_down=step)


class SloPolicy:
    """ScalingPolicy over `SloPlanner` (see the module docstring)."""

    def __init__(self, planner: SloPlanner, *, block_size: int, disaggregated: bool,
                 weights_source: str = "auto") -> None:
        self.planner = planner
        self.weights_source = weights_source
        self.interval_s = planner.spec.interval_s
        self.block_size = block_size
        self.disaggregated = disaggregated
        self.last_window: LoadWindow | None = None
        self._seen: dict[str, dict[str, float]] = {}
        self._last_now: float | None = None
        self._pending: list[Decision] = []

    def decide(self, workers: list[WorkerView], now: float) -> list[ScalingAction]:
        window = self._window(workers, now)
        if window is None:
            return []
        self.last_window = window
        current = counts_of(workers)
        step = self.planner.plan(window, current, now)
        self._pending.extend(step.decisions)
        return scaling_actions(step, workers, current, disaggregated=self.disaggregated)

    def take_decisions(self) -> list[Decision]:
        """Decisions made since the last call (the daemon records and shows them)."""
        out, self._pending = self._pending, []
        return out

    # ---- observation ------------------------------------------------------------------------

    def _window(self, workers: list[WorkerView], now: float) -> LoadWindow | None:
        first = self._last_now is None
        duration = 0.0 if first else now - self._last_now  # type: ignore[operator]
        self._last_now = now
        delta: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
        decode_requests = frontend_requests = rejected = osl_requests = osl_tokens = 0.0
        latency: dict[str, float] = {}
        has_frontend = False
        for w in workers:
            if not w.metrics:
                continue
            before = self._seen.get(w.id)
            now_values = {k: float(w.metrics.get(k, 0.0)) for k in _COUNTERS}
            if w.role == "frontend":
                now_values.update({k: float(v) for k, v in w.metrics.items() if "_le." in k})
            self._seen[w.id] = now_values
            if first:
                continue
            for name, value in now_values.items():
                base = before.get(name, 0.0) if before is not None else 0.0
                step = value - base if value >= base else value  # restarted: counts from zero
                if w.role == "frontend":
                    if name == "requests_total":
                        frontend_requests += step
                        has_frontend = True
                    elif name == "rejected_total":
                        rejected += step
                    elif name == "osl_requests_total":
                        osl_requests += step
                    elif name == "osl_tokens_total":
                        osl_tokens += step
                    elif "_le." in name:
                        latency[name] = latency.get(name, 0.0) + step
                    continue
                delta[name] += step
                if name == "requests_total" and w.role in ("decode", "both"):
                    decode_requests += step
        if first or duration <= 0:
            return None
        num_requests = int(frontend_requests if has_frontend else decode_requests)
        # Tokens are what the workers served; requests the frontend turned away (429/503) are
        # demand too, assumed shaped like the served ones.
        served = num_requests - rejected
        scale = num_requests / served if served > 0 and rejected > 0 else 1.0
        cached = delta["prefix_hit_blocks"] * self.block_size
        prefilled = max(0.0, delta["num_computed_tokens"] - delta["num_generated_tokens"])
        live = [w for w in workers if w.role != "frontend"]
        return LoadWindow(duration_s=duration, num_requests=num_requests,
                          input_tokens=int((prefilled + cached) * scale),
                          output_tokens=_decode_demand(delta["num_generated_tokens"] * scale, num_requests,
                                                       osl_requests, osl_tokens),
                          cached_tokens=int(cached * scale),
                          num_waiting=int(sum(w.metrics.get("num_waiting", 0.0) for w in live)),
                          queued_prefill_tokens=int(sum(w.metrics.get("waiting_prefill_tokens", 0.0)
                                                        for w in live if w.role == "prefill")),
                          num_decoding=int(sum(w.metrics.get("num_running", 0.0) for w in live
                                               if w.role in ("decode", "both") and w.state in COUNTED_STATES)),
                          # the frontend's measured means over the window (None: nothing measured)
                          ttft_s=_samples(latency, "ttft"), itl_s=_samples(latency, "itl"),
                          time_to_ready_s=expected_time_to_ready(live, self.weights_source)[0])

def expected_time_to_ready(workers: list[WorkerView], weights_source: str = "auto") -> tuple[float, str]:
    """(seconds, "peer" | "disk") a worker launched now needs to serve, from the workers' own
    measurements (`time_to_ready_seconds.<source>`): the peer figure when a ready worker can give
    it its weights, else the disk figure; (0, "") before anything was measured."""
    measured: dict[str, list[float]] = {"peer": [], "disk": []}
    for w in workers:
        for key, value in w.metrics.items():
            if key.startswith("time_to_ready_seconds."):
                source = key.split(".", 1)[1]
                measured["peer" if source == "peer" else "disk"].append(float(value))
    can_stream = weights_source != "disk" and any(w.state == "ready" for w in workers if w.role != "frontend")
    for source in (("peer", "disk") if can_stream else ("disk",)):
        if measured[source]:
            return statistics.median(measured[source]), source
    return 0.0, ""


def _samples(deltas: dict[str, float], name: str) -> tuple[float, ...]:
    """Approximate latency samples from histogram bucket deltas: each observation counts at its
    bucket's upper bound (conservative); the +Inf bucket counts at twice the largest bound."""
    prefix = f"{name}_le."
    bounds = sorted((float(k[len(prefix):]), v) for k, v in deltas.items()
                    if k.startswith(prefix) and k != prefix + "inf")
    total = deltas.get(prefix + "inf", 0.0)
    if total <= 0 or not bounds:
        return ()
    scale = min(1.0, MAX_LATENCY_SAMPLES / total)
    samples: list[float] = []
    below = 0.0
    for bound, cumulative in bounds:
        samples += [bound] * round((cumulative - below) * scale)
        below = cumulative
    samples += [2 * bounds[-1][0]] * round((total - below) * scale)
    return tuple(samples)


def _decode_demand(generated: float, num_requests: int, osl_requests: float, osl_tokens: float) -> int:
    """Output tokens the window's arrivals will generate: their expected output length where the
    client gave one (agent hint osl), the generated tokens' mean for the rest. Generated tokens
    alone lag: a request that arrived now decodes mostly in later windows."""
    hinted = min(osl_requests, num_requests)
    if hinted <= 0:
        return int(generated)
    mean = generated / num_requests if num_requests else 0.0
    return int(osl_tokens * hinted / osl_requests + mean * (num_requests - hinted))
