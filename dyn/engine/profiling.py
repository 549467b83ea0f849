"""Measuring an engine profile (`dyn profile`): sweep a live engine, fit the linear step model.

The data model and its JSON form live in dyn.engine.profile; this module
runs an engine of every role of a recipe and fills one in.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from dyn.config.recipe import MockTiming, Recipe
from dyn.config.topology import Topology
from dyn.engine.profile import EngineProfile, Hardware, RoleProfile, gpu_of

StepTimer = Any
"""Callable[[engine], float]: seconds of the step just taken (modelled for the mock, wall clock else)."""
PREFILL_REPEATS = 3
"""Prefill steps per prompt length; the fastest counts (other load only ever adds time)."""
DECODE_STEPS = 5
"""Timed decode steps per (batch, context) point; the median counts."""


def measure_role(engine: Any, *, block_size: int, max_batch_size: int, max_num_batched_tokens: int,
                 max_context: int, step_s: StepTimer, seed: int = 0) -> tuple[MockTiming, tuple, tuple]:
    """Sweep prompt lengths and batch sizes on a live engine; fit the linear step model.

    Returns (fitted timing incl. KV capacity, prefill samples, decode samples).
    Every prompt is distinct, so no sample is helped by the prefix cache. Only
    the Backend contract is used (add_request, step, abort, has_work, stats):
    a batch counts as prefilled once every request has streamed its first
    token, which the torch, mock and vLLM engines all report the same way.
    """
    import numpy as np

    from dyn.engine.backend import EngineRequest, SamplingParams

    rng = np.random.default_rng(seed)
    num_blocks = engine.stats().num_kv_blocks_total
    counter = iter(range(1 << 30))

    def prompt(n: int) -> list[int]:
        return rng.integers(3, 1000, size=n).tolist()

    # Warm-up: first-call kernel setup (oneDNN, allocator) must not land in the first sample.
    engine.add_request(EngineRequest("warmup", prompt(2 * block_size), SamplingParams(max_tokens=2, ignore_eos=True)))
    _drain(engine)
    prefill: list[tuple[int, float]] = []
    budget = min(max_num_batched_tokens, max_context - 1, num_blocks * block_size // 2)
    for frac in (0.125, 0.25, 0.5, 0.75, 1.0):
        n = max(block_size, int(budget * frac))
        times = []
        for _ in range(PREFILL_REPEATS):
            engine.add_request(EngineRequest(f"p{next(counter)}", prompt(n),
                                             SamplingParams(max_tokens=1, ignore_eos=True)))
            engine.step()
            times.append(step_s(engine))
            _drain(engine)
        prefill.append((n, min(times)))
    decode: list[tuple[int, int, float]] = []
    batches = sorted({b for b in (1, 4, 16, 64, max_batch_size) if b <= max_batch_size})
    for ctx in (block_size * 4, min(max_context // 2, block_size * 64)):
        for b in batches:
            if b * (ctx // block_size + 4) > num_blocks:
                continue
            # Long enough that no request ends before the timed steps, however the prefill is chunked.
            max_tokens = DECODE_STEPS + 4 + -(-b * ctx // max_num_batched_tokens)
            rids = [f"d{next(counter)}" for _ in range(b)]
            for rid in rids:
                engine.add_request(EngineRequest(rid, prompt(ctx),
                                                 SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
            started: set[str] = set()
            while len(started) < b and engine.has_work():
                started.update(out.request_id for out in engine.step() if out.token_ids)
            times = []
            for _ in range(DECODE_STEPS):
                engine.step()
                times.append(step_s(engine))
            # The median step is the middle one: each sequence then holds ctx + (steps + 1) // 2 tokens.
            decode.append((b, b * (ctx + (DECODE_STEPS + 1) // 2), sorted(times)[DECODE_STEPS // 2]))
            for rid in rids:
                engine.abort(rid)
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
    timing model); other engines are timed on the wall clock. A vLLM engine is
    built as a dyn worker builds it (same engine arguments and environment:
    KV space, threads), minus the KV connector and event publisher, which the
    profile does not time; one role at a time, closed before the next starts.
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
            on = _device(device, spec.device)
            with engine_env_for(spec, group, on):
                engine = _WallTimed(create_engine(spec, group, device=on, cpu_threads=group.cpu_threads),
                                    _time.perf_counter)
            step_s = lambda e: e.last_wall_s  # noqa: E731
        try:
            timing, prefill, decode = measure_role(
                engine, block_size=spec.block_size, max_batch_size=group.max_batch_size,
                max_num_batched_tokens=group.max_num_batched_tokens, max_context=spec.max_context,
                step_s=step_s)
        finally:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        roles[group.role] = RoleProfile(timing, Hardware(gpu[0], group.tp, gpu[1]), group.max_batch_size,
                                        group.max_num_batched_tokens, prefill, decode)
    return EngineProfile(recipe.name, spec.served_name, spec.engine, spec.block_size, "measured", roles,
                         {"*": f"measured by `dyn profile` ({'virtual clock' if spec.engine == 'mock' else 'wall clock'})"},
                         datetime.now(timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def engine_env_for(spec: Any, group: Any, device: str) -> Iterator[None]:
    """vLLM reads its settings (KV space, OpenMP threads) from the environment its workers start with."""
    if spec.engine != "vllm":
        yield
        return
    from dyn.engine.vllm_args import engine_env

    env = engine_env(group, device=device, cpu_threads=group.cpu_threads)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
