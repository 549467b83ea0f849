"""The SLO planner: forecasting, sizing, bounds, hysteresis, and a load step through the simulator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dyn.bench.trace import Trace, TraceRequest
from dyn.config.loader import load_recipe, load_topology
from dyn.engine.profile import mock_profile
from dyn.planner.forecast import ForecastError, HoltForecaster, make_forecaster
from dyn.planner.policy import Counts, LoadWindow, SloPlanner
from dyn.sim.cluster import Simulation
from dyn.sim.config import SimConfig
from dyn.sim.workload import build_requests

ROOT = Path(__file__).resolve().parents[2]


def test_holt_follows_a_ramp_and_forgets_a_level_shift():
    f = HoltForecaster()
    for x in range(10):
        f.update(10.0 * x)
    assert 90.0 < f.predict(1) < 110.0  # the trend carries it past the last value (90)
    for _ in range(15):
        f.update(5.0)
    assert f.predict(1) == pytest.approx(5.0, abs=1.0)
    with pytest.raises(ForecastError, match="alpha"):
        HoltForecaster(alpha=0.0)
    with pytest.raises(ForecastError, match="unknown forecaster"):
        make_forecaster("arima")


def _planner(**spec_changes) -> SloPlanner:
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    spec = replace(recipe.planner, **spec_changes)
    return SloPlanner(spec, mock_profile(recipe), gpus_per_worker={"prefill": 1, "decode": 1}, gpu_budget=8)


def _window(rate: float, input_tokens: int = 4000, output_tokens: int = 600, ttft=(), itl=()) -> LoadWindow:
    n = int(rate * 5)
    return LoadWindow(5.0, n, n * input_tokens, n * output_tokens, 0, tuple(ttft), tuple(itl))


def test_disabled_planner_keeps_counts():
    planner = _planner(enabled=False)
    step = planner.plan(_window(50.0), Counts(2, 2), now=5.0)
    assert step.target == Counts(2, 2) and not step.decisions


def test_sizing_grows_with_load_and_respects_bounds():
    planner = _planner()
    low = planner.plan(_window(2.0), Counts(1, 1), now=5.0).target
    high = _planner().plan(_window(18.0), Counts(1, 1), now=5.0).target
    assert high.prefill > low.prefill and high.decode >= low.decode
    huge = _planner().plan(_window(500.0), Counts(1, 1), now=5.0)
    assert huge.target == Counts(4, 4)  # the recipe's max
    up = [d for d in huge.decisions if d.action == "scale_up"]
    assert {d.role for d in up} == {"prefill", "decode"}
    assert all("rate" in d.inputs and d.reason for d in up)


def test_scale_down_waits_for_hysteresis_and_cooldown_and_never_on_a_miss():
    planner = _planner(cooldown_s=30.0)
    current = planner.plan(_window(18.0), Counts(1, 1), now=5.0).target
    peak = current.prefill
    assert peak > 1
    targets = []
    for i in range(2, 12):
        step = planner.plan(_window(0.5, ttft=[0.05]), current, now=5.0 * i)
        targets.append((5.0 * i, step.target))
        current = step.target
    first_down = next(t for t, c in targets if c.prefill < peak)
    assert first_down >= 5.0 + 30.0  # not inside the cooldown of the scale-up
    missed = _planner()
    for i in range(1, 10):  # the load falls but TTFT is missed: it must not shrink
        step = missed.plan(_window(0.5, ttft=[5.0] * 10), Counts(3, 1), now=5.0 * i)
        assert step.target.prefill >= 3


def test_flip_instead_of_stop_and_launch():
    planner = _planner(min_decode=1, max_decode=4)
    current = Counts(1, 4)
    planner.plan(_window(0.1), current, now=0.0)
    step = None
    for i in range(1, 12):  # prefill-heavy load: long prompts, 1-token answers
        step = planner.plan(LoadWindow(5.0, 60, 60 * 8000, 60, 0), current, now=100.0 + 5.0 * i)
        if step.decisions and any(d.action == "flip" for d in step.decisions):
            break
        current = step.target
    assert step is not None and any(d.action == "flip" and d.role == "prefill" for d in step.decisions)


def _step_trace() -> Trace:
    """6 req/s, tripled to 18 req/s for 100 s, then back (4000-token prompts, 400-token answers)."""
    requests, t = [], 0.0
    for start, end, rate in ((0.0, 60.0, 6.0), (60.0, 160.0, 18.0), (160.0, 300.0, 6.0)):
        t = start
        while t < end:
            requests.append(TraceRequest(t, 4000, 400))
            t += 1.0 / rate
    return Trace(tuple(requests), 0, "synthetic-step")


def test_load_step_scales_up_then_down_within_bounds_without_flapping():
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    recipe = replace(recipe, workers=tuple(replace(g, replicas=1) for g in recipe.workers))
    spec = recipe.planner
    sim = Simulation(load_topology(ROOT / "topologies/local.yaml"), recipe, mock_profile(recipe),
                     build_requests(_step_trace(), recipe.model.block_size), SimConfig(startup_s=5.0))
    sim.run()
    counts = [(t.time_s, t.counts["prefill"], t.counts["decode"]) for t in sim.ticks]
    peak = max(p for t, p, _ in counts if 60 <= t <= 170)
    assert peak > max(p for t, p, _ in counts if t < 60)  # scaled prefill up for the surge
    assert max(d for t, _, d in counts if 60 <= t <= 170) > 1  # and decode
    assert counts[-1][1] < peak  # and back down after it
    changes = [d for d in sim.decisions if d.action != "hold"]
    for d in changes:
        assert spec.min_prefill <= d.after.prefill <= spec.max_prefill
        assert spec.min_decode <= d.after.decode <= spec.max_decode
    for role in ("prefill", "decode"):
        moves = [(d.time_s, d.after.get(role) - d.before.get(role)) for d in changes
                 if d.after.get(role) != d.before.get(role)]
        for (t0, d0), (t1, d1) in zip(moves, moves[1:]):
            if d0 * d1 < 0:  # a reversal must wait out the cooldown
                assert t1 - t0 >= spec.cooldown_s, (role, moves)
    # After the first adjustment to the surge, TTFT is met in >= 95% of intervals.
    # Adjusted: the last scale-up's workers have loaded (startup 5 s) and drained the backlog.
    adjusted = max(d.time_s for d in changes if d.action == "scale_up") + 5.0 + 3 * spec.interval_s
    windows = [t.window for t in sim.ticks if t.time_s >= adjusted and t.window.get("rate", 0) > 0]
    met = sum(1 for w in windows if w["ttft_p90_s"] <= spec.ttft_ms / 1000.0)
    assert windows and met / len(windows) >= 0.95, windows


def test_a_slow_time_to_ready_sizes_for_load_further_ahead():
    """On a rising load, a worker that takes minutes to load (disk) must be launched for the load it will
    meet when ready; one that streams from a peer in seconds needs only the next interval's."""
    def need_on_ramp(time_to_ready_s: float) -> tuple[int, dict]:
        recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
        planner = SloPlanner(replace(recipe.planner, max_decode=64, max_prefill=64), mock_profile(recipe),
                             gpus_per_worker={"prefill": 1, "decode": 1}, gpu_budget=128)
        step = None
        for i in range(8):
            window = replace(_window(2.0 + 2.0 * i), time_to_ready_s=time_to_ready_s)
            step = planner.plan(window, Counts(1, 1), now=5.0 * (i + 1))
        return step.target.prefill + step.target.decode, planner.decisions[-1].inputs

    interval_s = load_recipe(ROOT / "recipes/mock-local.yaml").planner.interval_s
    fast, fast_inputs = need_on_ramp(interval_s * 0.8)   # peer: inside one interval
    slow, slow_inputs = need_on_ramp(95.0)               # disk: many intervals
    assert slow > fast
    assert fast_inputs["forecast_intervals"] == 2
    assert slow_inputs["forecast_intervals"] == 1 + -(-95.0 // interval_s)
    assert slow_inputs["time_to_ready_s"] == 95.0
