"""One call from files to a report: what `dyn sim` and scripts/bench_sim.py run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dyn.bench.trace import MOONCAKE_BLOCK_TOKENS, Trace, load_trace
from dyn.config.loader import load_recipe, load_topology
from dyn.config.scaling import scale_to_topology
from dyn.config.recipe import Recipe
from dyn.config.topology import Topology
from dyn.engine.profile import EngineProfile, load_profile, mock_profile, profile_path
from dyn.sim.cluster import Simulation
from dyn.sim.config import SimConfig
from dyn.sim.report import sim_report
from dyn.sim.errors import SimError
from dyn.sim.workload import SimRequest, build_requests, stream_requests


@dataclass(frozen=True)
class SimInputs:
    topology: Topology
    recipe: Recipe
    profile: EngineProfile
    trace: Trace


def load_inputs(topology: str | Path, recipe: str | Path, trace: str | Path, *,
                profile: str | Path | None = None, use_mock: bool = False,
                max_requests: int | None = None, stream: bool = False) -> SimInputs:
    """Read the files. Profile: `profile` if given, else the recipe's NAME.profile.json if it
    exists (and not `use_mock`), else the mock engine's timing model from the recipe.
    `stream`: the trace is read during the run instead (`inputs.trace` holds no requests)."""
    topo = load_topology(topology)
    rec = scale_to_topology(load_recipe(recipe), topo)
    if profile is not None:
        prof = load_profile(profile, rec)
    elif not use_mock and profile_path(recipe).exists():
        prof = load_profile(profile_path(recipe), rec)
    else:
        prof = mock_profile(rec, topo)
    if stream:
        if Path(trace).suffix.lower() not in (".jsonl", ".json"):
            raise SimError("only Mooncake .jsonl traces can be streamed", field="trace")
        return SimInputs(topo, rec, prof, Trace((), MOONCAKE_BLOCK_TOKENS, str(trace)))
    return SimInputs(topo, rec, prof, load_trace(trace, max_requests))


def simulate(inputs: SimInputs, config: SimConfig = SimConfig(), *, time_scale: float = 1.0,
             max_requests: int | None = None) -> dict[str, Any]:
    """Run the trace through the simulated deployment; the report dict (see dyn.sim.report)."""
    started = time.perf_counter()
    block = config.block_tokens or inputs.recipe.model.block_size
    if block % inputs.recipe.model.block_size:
        raise SimError(f"must be a multiple of model.block_size {inputs.recipe.model.block_size}, got {block}",
                       field="block_tokens")
    if inputs.trace.requests:
        requests: Iterable[SimRequest] = build_requests(inputs.trace, block, max_requests=max_requests,
                                                        seed=config.seed, time_scale=time_scale)
    else:  # streamed (load_inputs(stream=True))
        requests = stream_requests(inputs.trace.source, block, max_requests=max_requests, seed=config.seed,
                                   time_scale=time_scale)
    sim = Simulation(inputs.topology, inputs.recipe, inputs.profile, requests, config)
    end_s = sim.run()
    first = sim.requests[0].arrival_s if sim.requests else 0.0
    return sim_report(sim, max(end_s - first, 1e-9), inputs.trace.block_tokens,
                      {"trace": inputs.trace.source, "time_scale": time_scale,
                       "wall_s": round(time.perf_counter() - started, 2)})
