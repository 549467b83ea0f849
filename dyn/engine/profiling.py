"""Measuring an engine profile (`dyn profile`): sweep a live engine, fit the linear step model.

The data model and its JSON form live in dyn.engine.profile; this module
runs an engine of every role of a recipe and fills one in.
"""

from __future__ import annotations

from typing import Any

from dyn.config.recipe import MockTiming, Recipe
from dyn.config.topology import Topology
from dyn.engine.profile import EngineProfile, Hardware, RoleProfile, gpu_of

StepTimer = Any
"""Callable[[engine], float]: seconds of the step just taken (modelled for the mock, wall clock else)."""


def measure_role(engine: Any, *, block_size: int, max_batch_size: int, max_num_batched_tokens: int,
                 max_context: int, step_s: StepTimer, seed: int = 0) -> tuple[MockTiming, tuple, tuple]:
    """Sweep prompt lengths and batch sizes on a live engine; fit the linear step model.

    Returns (fitted timing incl. KV capacity, prefill samples, decode samples).
    Every prompt is distinct, so no sample is helped by the prefix cache.
    """
    import numpy as np

    from dyn.engine.backend import EngineRequest, SamplingParams

    rng = np.random.default_rng(seed)
    num_blocks = engine.stats().num_kv_blocks_total
    counter = iter(range(1 << 30))

    def prompt(n: int) -> list[int]:
        return rng.integers(3, 1000, size=n).tolist()

    prefill: list[tuple[int, float]] = []
    budget = min(max_num_batched_tokens, max_context - 1, num_blocks * block_size // 2)
    for frac in (0.125, 0.25, 0.5, 0.75, 1.0):
        n = max(block_size, int(budget * frac))
        rid = f"p{next(counter)}"
        engine.add_request(EngineRequest(rid, prompt(n), SamplingParams(max_tokens=1, ignore_eos=True)))
        engine.step()
        prefill.append((n, step_s(engine)))
        _drain(engine)
    decode: list[tuple[int, int, float]] = []
    batches = sorted({b for b in (1, 4, 16, 64, max_batch_size) if b <= max_batch_size})
    for ctx in (block_size * 4, min(max_context // 2, block_size * 64)):
        for b in batches:
            if b * (ctx // block_size + 4) > num_blocks:
                continue
            for _ in range(b):
                engine.add_request(EngineRequest(f"d{next(counter)}", prompt(ctx),
                                                 SamplingParams(max_tokens=8, ignore_eos=True)))
            while engine.stats().num_waiting_prefill_tokens > 0:
                engine.step()
            times = []
            for _ in range(3):
                engine.step()
                times.append(step_s(engine))
            decode.append((b, b * (ctx + 2), sorted(times)[1]))
            _drain(engine)
    return _fit(prefill, decode, num_blocks), tuple(prefill), tuple(decode)


def _drain(engine: Any) -> None:
    while engine.has_work():
        engine.step()


def _fit(prefill: list[tuple[int, float]], decode: list[tuple[int, int, float]], num_blocks: int) -> MockTiming:
    import numpy as np

    p = np.array(prefill, dtype=float)
    (pb, pk), *_ = np.linalg.lstsq(np.c_[np.ones(len(p)), p[:, 0]], p[:, 1], rcond=None)
    d = np.array(decode, dtype=float)
    (db, ds, dc), *_ = np.linalg.lstsq(np.c_[np.ones(len(d)), d[:, 0], d[:, 1]], d[:, 2], rcond=None)
    return MockTiming(prefill_base_s=max(float(pb), 0.0), prefill_s_per_token=max(float(pk), 0.0),
                      decode_base_s=max(float(db), 0.0), decode_s_per_seq=max(float(ds), 0.0),
                      decode_s_per_ctx_token=max(float(dc), 0.0), num_kv_blocks=int(num_blocks))


def profile_recipe(recipe: Recipe, topology: Topology | None = None, *, device: str = "auto") -> EngineProfile:
    """Measure one worker of every role of the recipe on this machine (`dyn profile`).

    The mock engine runs on its virtual clock (its measured profile equals its
    timing model); other engines are timed on the wall clock.
    """
    import time as _time
    from datetime import datetime, timezone

    from dyn.engine.factory import create_engine
    from dyn.engine.mock import MockEngine

    spec = recipe.model
    gpu = gpu_of(topology)
    roles: dict[str, RoleProfile] = {}
    for group in recipe.workers:
        if spec.engine == "mock":
            engine: Any = MockEngine(spec.mock, block_size=spec.block_size, max_context=spec.max_context,
                                     max_batch_size=group.max_batch_size,
                                     max_num_batched_tokens=group.max_num_batched_tokens, clock="virtual")
            step_s: StepTimer = lambda e: e.last_step_duration_s  # noqa: E731
        else:
            engine = create_engine(spec, group, device=_device(device, spec.device))
            engine = _WallTimed(engine, _time.perf_counter)
            step_s = lambda e: e.last_wall_s  # noqa: E731
        timing, prefill, decode = measure_role(
            engine, block_size=spec.block_size, max_batch_size=group.max_batch_size,
            max_num_batched_tokens=group.max_num_batched_tokens, max_context=spec.max_context, step_s=step_s)
        roles[group.role] = RoleProfile(timing, Hardware(gpu[0], group.tp, gpu[1]), group.max_batch_size,
                                        group.max_num_batched_tokens, prefill, decode)
    return EngineProfile(recipe.name, spec.served_name, spec.engine, spec.block_size, "measured", roles,
                         {"*": f"measured by `dyn profile` ({'virtual clock' if spec.engine == 'mock' else 'wall clock'})"},
                         datetime.now(timezone.utc).isoformat(timespec="seconds"))


class _WallTimed:
    """Wraps an engine so each step's wall time is readable as `last_wall_s`."""

    def __init__(self, engine: Any, clock: Any) -> None:
        self._engine, self._clock, self.last_wall_s = engine, clock, 0.0

    def step(self) -> Any:
        started = self._clock()
        out = self._engine.step()
        self.last_wall_s = self._clock() - started
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _device(requested: str, recipe_device: str) -> str:
    device = recipe_device if requested == "auto" else requested
    if device == "auto":
        try:
            import torch
            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return device
