"""The scaling seam: the daemon asks a ScalingPolicy what to change, then acts.

Today's policy keeps the recipe's counts (`StaticPolicy`). The SLO planner
(a later issue) implements the same protocol from observed load and the
engine profile; the daemon applies its actions (flip a role, add or remove
a worker) through the same launch and drain paths it uses for restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from dyn.planner.health import ProcessSlot


@dataclass(frozen=True)
class WorkerView:
    """What a policy may read about one worker (a copy: policies never touch slots)."""

    id: str
    role: str
    node: str
    gpus: tuple[int, ...]
    state: str
    metrics: dict[str, float]

    @classmethod
    def of(cls, slot: ProcessSlot) -> "WorkerView":
        return cls(slot.id, slot.role, slot.node, slot.gpus, slot.state, dict(slot.metrics))


@dataclass(frozen=True)
class ScalingAction:
    kind: Literal["set_role", "add", "remove"]
    worker_id: str | None = None
    """set_role / remove: the worker; add: None (the daemon places it)."""
    role: str | None = None
    reason: str = ""


class ScalingPolicy(Protocol):
    """Decides changes to the worker set; called every `interval_s` while the deployment runs."""

    interval_s: float

    def decide(self, workers: list[WorkerView], now: float) -> list[ScalingAction]:
        """Return the actions to apply now (empty: keep everything). Must not block or do I/O.

        `workers` holds every process, the frontend included (role "frontend"): its heartbeat
        carries the request count a policy may read; actions never name it."""
        ...

    def take_decisions(self) -> list["Decision"]:
        """Decision records made since the last call (status, metrics); [] when none."""
        ...


@dataclass
class StaticPolicy:
    """Keep the recipe's counts; only the health loop replaces failed workers."""

    interval_s: float = 10.0

    def decide(self, workers: list[WorkerView], now: float) -> list[ScalingAction]:
        return []

    def take_decisions(self) -> list["Decision"]:
        return []


# ---- the SLO planner ------------------------------------------------------------------------
#
# `SloPlanner` is pure: observed window + profile + spec + now -> target counts and decision
# records, so the daemon (through `SloPolicy`, the seam above, on its clock and its workers'
# metrics) and the simulator (directly, on virtual time) run the same object.

import math  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import asdict, field  # noqa: E402

from dyn.config.recipe import PlannerSpec  # noqa: E402
from dyn.engine.profile import EngineProfile  # noqa: E402
from dyn.planner.forecast import LoadForecast, LoadPredictor  # noqa: E402

Action = Literal["scale_up", "scale_down", "flip", "hold"]


@dataclass(frozen=True, slots=True)
class LoadWindow:
    """What was observed over one planner interval."""

    duration_s: float
    num_requests: int
    """Requests that arrived."""
    input_tokens: int
    """Prompt tokens of those requests."""
    output_tokens: int
    """Output tokens of those requests (expected, or generated when only that is known)."""
    cached_tokens: int = 0
    """Prompt tokens served from prefix caches."""
    ttft_s: tuple[float, ...] = ()
    """TTFTs measured in the window (empty: not measured)."""
    itl_s: tuple[float, ...] = ()
    """Per-request mean inter-token latencies measured in the window."""
    num_waiting: int = 0
    """Requests queued for prefill at the end of the window."""
    queued_prefill_tokens: int = 0
    """Prompt tokens not yet prefilled at the end of the window (a backlog to drain)."""
    time_to_ready_s: float = 0.0
    """Measured launch -> serving time of a new worker (from a live peer when one can serve its
    weights, else from disk); 0: unknown. A worker added now helps only after this long, so
    the planner sizes for the load forecast that far ahead."""
    num_decoding: int = 0
    """Sequences running on decode workers at the end of the window (0: none or unknown)."""

    @property
    def request_rate(self) -> float:
        return self.num_requests / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Counts:
    prefill: int
    decode: int

    def get(self, role: str) -> int:
        return self.prefill if role == "prefill" else self.decode

    def with_role(self, role: str, value: int) -> "Counts":
        return Counts(value, self.decode) if role == "prefill" else Counts(self.prefill, value)


@dataclass(frozen=True, slots=True)
class Decision:
    """One planner decision, with the inputs it was made from (for status, metrics, the sim)."""

    time_s: float
    action: Action
    role: str | None
    """Role whose count changes (flip: the role gaining the worker)."""
    num_workers: int
    before: Counts
    after: Counts
    reason: str
    inputs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["before"], out["after"] = asdict(self.before), asdict(self.after)
        return out


@dataclass(frozen=True, slots=True)
class PlanStep:
    target: Counts
    decisions: tuple[Decision, ...]
    """Empty when nothing changed and nothing was held back."""


class SloPlanner:
    """Prefill/decode counts that meet the TTFT and ITL targets at least cost.

    Sizing, per forecast interval (rate r, prompt I, output O, hit share h):
      prefill: r * I * (1 - h) tokens/s at utilisation rho per worker, where rho
               keeps the M/D/1 mean wait + own prefill within half the TTFT target;
      decode:  Little's law, r * O * step(b) sequences in flight, b = the largest
               batch whose step fits 0.9 * ITL and whose KV fits the pool.
    A prefill backlog left at the end of the window is added to drain in one
    interval. Misses observed in the window raise a per-role gain (x1.15, up to x3) that
    decays when targets are met, so model error is corrected from measurements.
    Changes: up at once (unless a scale-down of that role is inside its
    cooldown); never down for a role that missed its target in the window; down only after `down_intervals` intervals in a row that would
    still need fewer workers at (1 + band) x the load, outside the cooldown, by
    at most `max_step_down`; never below the decode workers the sequences decoding
    now need at the ITL batch b (long requests arrive in bursts: a window without
    arrivals is no surplus while they decode). A role flip replaces a down+up pair
    when both roles use the same GPUs per worker.
    """

    def __init__(self, spec: PlannerSpec, profile: EngineProfile, *, gpus_per_worker: dict[str, int],
                 gpu_budget: int, forecaster: str = "holt", band: float = 0.2, down_intervals: int = 3,
                 max_step_down: int = 2, history: int = 1000) -> None:
        self.spec = spec
        self.profile = profile
        self.gpus_per_worker = {role: gpus_per_worker.get(role, 1) for role in ("prefill", "decode")}
        self.gpu_budget = gpu_budget
        self.band = band
        self.down_intervals = down_intervals
        self.max_step_down = max_step_down
        self.predictor = LoadPredictor(forecaster)
        self.decisions: deque[Decision] = deque(maxlen=history)
        self._gain = {"prefill": 1.0, "decode": 1.0}
        self._want_down = {"prefill": 0, "decode": 0}
        self._last_change: dict[str, tuple[float, int]] = {}
        """role -> (time, direction +1/-1) of its last change."""

    def plan(self, window: LoadWindow, current: Counts, now: float) -> PlanStep:
        """Feed one interval's observations; return the counts to run next."""
        rate = window.request_rate
        n = window.num_requests
        self.predictor.update(rate, window.input_tokens / n if n else None,
                              window.output_tokens / n if n else None,
                              window.cached_tokens / window.input_tokens if window.input_tokens else None)
        if not self.spec.enabled:
            return PlanStep(current, ())
        self._update_gains(window)
        # plan for the load when a worker launched now will serve: one interval, plus its time to ready
        ahead = 1 + math.ceil(window.time_to_ready_s / self.spec.interval_s) if window.time_to_ready_s > 0 else 1
        forecast = self.predictor.predict(ahead)
        load = _max_rate(forecast, rate)
        backlog_s = window.queued_prefill_tokens / max(self.spec.interval_s, 1e-9)
        need_up = self._needs(load, backlog_s)
        need_down = self._needs(_scaled(load, 1.0 + self.band), backlog_s)
        in_use = min(self._decoding_need(load, window.num_decoding), self.spec.max_decode)
        if in_use > need_down.decode:
            need_down = need_down.with_role("decode", in_use)
        missed = self._missed(window)
        inputs = self._inputs(window, forecast, need_up)
        if window.time_to_ready_s > 0:
            inputs.update(time_to_ready_s=round(window.time_to_ready_s, 2), forecast_intervals=ahead)
        target, decisions = current, []
        for role in ("prefill", "decode"):
            have, want_up, want_down = current.get(role), need_up.get(role), need_down.get(role)
            if want_up > have:
                self._want_down[role] = 0
                if self._in_cooldown(role, now, direction=+1):
                    decisions.append(self._hold(now, role, current, inputs, f"needs {want_up}, in cooldown"))
                    continue
                target = target.with_role(role, want_up)
            elif want_down < have and not missed[role]:
                self._want_down[role] += 1
                if self._want_down[role] < self.down_intervals:
                    continue
                if self._in_cooldown(role, now, direction=-1):
                    continue
                target = target.with_role(role, max(want_down, have - self.max_step_down))
            else:
                self._want_down[role] = 0
        target = self._borrow(target, current, need_down, missed, now)
        target = self._fit_budget(target, current)
        decisions += self._record(now, current, target, inputs)
        return PlanStep(target, tuple(decisions))

    # ---- sizing ---------------------------------------------------------------------------

    def _needs(self, load: LoadForecast, backlog_tokens_per_s: float = 0.0) -> Counts:
        spec = self.spec
        raw = Counts(self._prefill_need(load, backlog_tokens_per_s), self._decode_need(load))
        return Counts(min(max(raw.prefill, spec.min_prefill), spec.max_prefill),
                      min(max(raw.decode, spec.min_decode), spec.max_decode))

    def _prefill_need(self, load: LoadForecast, backlog_tokens_per_s: float) -> int:
        role = self.profile.role("prefill")
        uncached = load.input_tokens * (1.0 - load.hit_rate)
        tokens_per_s = load.request_rate * uncached * self._gain["prefill"] + backlog_tokens_per_s
        if tokens_per_s <= 0:
            return 0
        service_s = role.prompt_prefill_s(int(uncached))
        wait_budget_s = 0.5 * self.spec.ttft_ms / 1000.0 - service_s
        rho = 0.5 if wait_budget_s <= 0 else min(0.9, 2 * wait_budget_s / (service_s + 2 * wait_budget_s))
        return math.ceil(tokens_per_s / (role.prefill_tokens_per_s * rho))

    def _decode_need(self, load: LoadForecast) -> int:
        role = self.profile.role("decode")
        if load.request_rate <= 0:
            return 0
        context, batch = self._decode_batch(load)
        if batch == 0:
            return self.spec.max_decode
        step_s = role.decode_step_s(batch, int(batch * context))
        in_flight = load.request_rate * load.output_tokens * step_s * self._gain["decode"]
        return math.ceil(in_flight / (0.9 * batch))

    def _decoding_need(self, load: LoadForecast, num_decoding: int) -> int:
        """Decode workers that the sequences decoding now fill at the ITL batch (a floor for scale-down)."""
        if num_decoding <= 0:
            return 0
        batch = self._decode_batch(load)[1]
        return self.spec.max_decode if batch == 0 else math.ceil(num_decoding / batch)

    def _decode_batch(self, load: LoadForecast) -> tuple[float, int]:
        """(mean context per sequence, the largest batch whose step fits 0.9 x ITL; 0: none fits)."""
        context = load.input_tokens + load.output_tokens / 2
        role = self.profile.role("decode")
        return context, role.max_decode_batch(0.9 * self.spec.itl_ms / 1000.0, context, self.profile.block_size)

    def _missed(self, window: LoadWindow) -> dict[str, bool]:
        """Roles whose target was missed in the window: those never scale down on it."""
        return {"prefill": _met(window.ttft_s, self.spec.ttft_ms / 1000.0) < 0.95,
                "decode": _met(window.itl_s, self.spec.itl_ms / 1000.0) < 0.95}

    def _update_gains(self, window: LoadWindow) -> None:
        for role, samples, target_s in (("prefill", window.ttft_s, self.spec.ttft_ms / 1000.0),
                                        ("decode", window.itl_s, self.spec.itl_ms / 1000.0)):
            if not samples:
                continue
            gain = self._gain[role] * (1.15 if _met(samples, target_s) < 0.95 else 0.97)
            self._gain[role] = min(max(gain, 1.0), 3.0)

    def _borrow(self, target: Counts, current: Counts, need_down: Counts, missed: dict[str, bool],
                now: float) -> Counts:
        """A role that grows takes surplus workers of the other role (a flip) before launching."""
        if self.gpus_per_worker["prefill"] != self.gpus_per_worker["decode"]:
            return target
        for grow, give in (("prefill", "decode"), ("decode", "prefill")):
            up = target.get(grow) - current.get(grow)
            spare = min(current.get(give), target.get(give)) - need_down.get(give)
            if up > 0 and spare > 0 and not missed[give] and not self._in_cooldown(give, now, -1):
                target = target.with_role(give, min(current.get(give), target.get(give)) - min(up, spare))
        return target

    def _fit_budget(self, target: Counts, current: Counts) -> Counts:
        """Never more GPUs than the budget: shrink growth, largest relative growth first."""
        gpus = self.gpus_per_worker
        while target.prefill * gpus["prefill"] + target.decode * gpus["decode"] > self.gpu_budget:
            growth = {r: target.get(r) / max(current.get(r), 1) for r in ("prefill", "decode")
                      if target.get(r) > getattr(self.spec, f"min_{r}")}
            if not growth:
                break
            role = max(growth, key=growth.get)  # type: ignore[arg-type]
            target = target.with_role(role, target.get(role) - 1)
        return target

    # ---- bookkeeping ----------------------------------------------------------------------

    def _in_cooldown(self, role: str, now: float, direction: int) -> bool:
        last = self._last_change.get(role)
        if last is None or now - last[0] >= self.spec.cooldown_s:
            return False
        return direction < 0 or last[1] < 0

    def _record(self, now: float, before: Counts, after: Counts, inputs: dict[str, float]) -> list[Decision]:
        dp, dd = after.prefill - before.prefill, after.decode - before.decode
        out: list[Decision] = []
        same_gpus = self.gpus_per_worker["prefill"] == self.gpus_per_worker["decode"]
        if same_gpus and dp * dd < 0:
            flips = min(abs(dp), abs(dd))
            gainer = "prefill" if dp > 0 else "decode"
            mid = before.with_role(gainer, before.get(gainer) + flips).with_role(
                "decode" if gainer == "prefill" else "prefill",
                before.get("decode" if gainer == "prefill" else "prefill") - flips)
            out.append(Decision(now, "flip", gainer, flips, before, mid,
                                f"flip {flips} worker(s) to {gainer}: cheaper than stop + launch", inputs))
            before = mid
            dp, dd = after.prefill - before.prefill, after.decode - before.decode
        for role, delta in (("prefill", dp), ("decode", dd)):
            if not delta:
                continue
            nxt = before.with_role(role, before.get(role) + delta)
            what = "TTFT" if role == "prefill" else "ITL"
            reason = (f"forecast load needs {nxt.get(role)} {role} worker(s) for the {what} target"
                      if delta > 0 else f"{self.down_intervals} intervals with surplus {role} capacity")
            out.append(Decision(now, "scale_up" if delta > 0 else "scale_down", role, abs(delta),
                                before, nxt, reason, inputs))
            before = nxt
        for d in out:
            if d.action == "flip":
                self._mark(d.role or "", now, +1)
                self._mark("decode" if d.role == "prefill" else "prefill", now, -1)
            else:
                self._mark(d.role or "", now, +1 if d.action == "scale_up" else -1)
        self.decisions.extend(out)
        return out

    def _mark(self, role: str, now: float, direction: int) -> None:
        self._last_change[role] = (now, direction)
        self._want_down[role] = 0

    def _hold(self, now: float, role: str, current: Counts, inputs: dict[str, float], why: str) -> Decision:
        decision = Decision(now, "hold", role, 0, current, current, why, inputs)
        self.decisions.append(decision)
        return decision

    def _inputs(self, window: LoadWindow, forecast: LoadForecast, need: Counts) -> dict[str, float]:
        out = {"rate": round(window.request_rate, 3), "forecast_rate": round(forecast.request_rate, 3),
               "input_tokens": round(forecast.input_tokens, 1), "output_tokens": round(forecast.output_tokens, 1),
               "hit_rate": round(forecast.hit_rate, 3), "need_prefill": need.prefill, "need_decode": need.decode,
               "gain_prefill": round(self._gain["prefill"], 3), "gain_decode": round(self._gain["decode"], 3),
               "num_waiting": window.num_waiting, "num_decoding": window.num_decoding}
        if window.ttft_s:
            out["ttft_p95_s"] = round(_p95(window.ttft_s), 4)
        if window.itl_s:
            out["itl_p95_s"] = round(_p95(window.itl_s), 5)
        return out


def _max_rate(forecast: LoadForecast, observed: float) -> LoadForecast:
    """Plan for the forecast, but never below what was just observed (scale-up must not lag)."""
    return LoadForecast(max(forecast.request_rate, observed), forecast.input_tokens,
                        forecast.output_tokens, forecast.hit_rate)


def _scaled(load: LoadForecast, factor: float) -> LoadForecast:
    return LoadForecast(load.request_rate * factor, load.input_tokens, load.output_tokens, load.hit_rate)


def _met(samples: tuple[float, ...], target_s: float) -> float:
    """Share of samples within the target (1.0 when nothing was measured)."""
    return sum(1 for s in samples if s <= target_s) / len(samples) if samples else 1.0


def _p95(values: tuple[float, ...]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
