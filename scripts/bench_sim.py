"""Compare routers like for like in `dyn sim`: every policy gets the same treatments and the same tuning.

Each trace is cut in two: the first half TUNES, the second half REPORTS (its
arrivals shifted to start at 0; caches start cold for every policy alike).
Nothing reported was chosen on the requests it is reported on.

For every router policy:
  1. Tuning (first half): `router.prefill_weight` over WEIGHTS for the policies
     whose cost uses it (kv, dynamo), with the planner on; the others have
     nothing to tune. Rule: highest goodput per GPU, then SLO attainment.
  2. Treatment "planner" (second half): the SLO planner on, from the recipe's counts.
  3. Treatment "best fixed split" (second half): planner off, the split picked
     from the same SPLITS grid on the first half by the same rule.

    nice -n 10 .venv/bin/python scripts/bench_sim.py --max-requests 1000 --speedup 4   (about 6 min on 2 busy cores)

Traces are read from --traces-dir (default: ../shared/traces); a missing one says where to get it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyn.bench.trace import WHERE_TO_GET, Trace  # noqa: E402
from dyn.sim.config import SimConfig  # noqa: E402
from dyn.sim.run import SimInputs, load_inputs, simulate  # noqa: E402

TRACES = {"mooncake-conv": "mooncake/conversation_trace.jsonl",
          "azure-conv": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv",
          "azure-code": "azure-llm-2023/AzureLLMInferenceTrace_code.csv"}
POLICIES = ("kv", "dynamo", "sglang", "llm-d", "least-loaded", "round-robin")
WEIGHTED = frozenset({"kv", "dynamo"})
"""Policies whose cost uses router.prefill_weight (the parameter tuned here)."""
WEIGHTS = (8.0, 2.0, 32.0)
"""Around the recipe default (8, itself picked on Mooncake: see RouterSpec.prefill_weight).
A tie keeps the first in grid order (here: the default), as for SPLITS."""
SPLITS = ((4, 14), (8, 12), (12, 10), (16, 8))
"""(prefill tp2, decode tp4): 64..72 GPUs of the 72."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces-dir", default=str(_default_traces_dir()))
    parser.add_argument("--trace", action="append", choices=sorted(TRACES), help="default: all")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="default: all")
    parser.add_argument("--topology", default=str(ROOT / "topologies/gb200-nvl72.yaml"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes/llama-3.1-70b-nvl72.yaml"))
    parser.add_argument("--max-requests", type=int, default=1000, help="per trace, both halves together")
    parser.add_argument("--speedup", type=float, default=4.0, help="arrival compression")
    parser.add_argument("--json", dest="json_out", help="write every report here")
    args = parser.parse_args()
    rows, reports = [], {}
    for name in args.trace or list(TRACES):
        path = Path(args.traces_dir) / TRACES[name]
        if not path.is_file():
            sys.exit(f"{path}: trace not found. {WHERE_TO_GET}")
        inputs = load_inputs(args.topology, args.recipe, path, max_requests=args.max_requests)
        tune, report = _halves(inputs.trace)
        started = time.perf_counter()
        print(f"# {name}: {inputs.profile.method} profile, speedup {args.speedup}; tune on requests "
              f"0-{len(tune.requests) - 1}, report on {len(tune.requests)}-"
              f"{len(tune.requests) + len(report.requests) - 1}", file=sys.stderr)
        reports[name] = {}
        for policy in args.policy or POLICIES:
            chosen = _tune(replace(inputs, trace=tune), policy, args.speedup)
            tuned = _with_weight(inputs, chosen["prefill_weight"])
            on_report = replace(tuned, trace=report)
            planner = simulate(on_report, SimConfig(router_policy=policy, planner=True), time_scale=args.speedup)
            p, d = chosen["split"]
            fixed = simulate(on_report, SimConfig(router_policy=policy, planner=False, num_prefill=p, num_decode=d),
                             time_scale=args.speedup)
            weight = f"{chosen['prefill_weight']:g}" if policy in WEIGHTED else "-"
            rows.append((name, policy, "planner", weight, planner))
            rows.append((name, policy, f"fixed {p}P/{d}D", weight, fixed))
            reports[name][policy] = {"tuning": chosen, "planner": planner, "fixed": fixed}
            print(f"#   {policy}: weight {weight}, split {p}P/{d}D (both picked on the first half)",
                  file=sys.stderr)
        print(f"#   {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("| trace | policy | treatment | prefill_weight | SLO attainment | goodput/GPU (req/GPU-s) | GPU-s "
          "| mean GPUs | hit rate | TTFT p90 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, policy, treatment, weight, r in rows:
        print(f"| {name} | {policy} | {treatment} | {weight} | {r['slo_attainment']:.1%} | "
              f"{r['goodput_per_gpu']:.5f} | {r['gpu_seconds']:.0f} | {r['mean_gpus']:.1f} | "
              f"{(r['prefix_hit_rate'] or 0):.1%} | {r['ttft_ms']['p90']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=1))


def _default_traces_dir() -> Path:
    """../shared/traces beside the checkout (or beside its parent, for a worktree)."""
    return next((p / "shared/traces" for p in (ROOT.parent, ROOT.parents[1]) if (p / "shared/traces").is_dir()),
                ROOT.parent / "shared/traces")


def _tune(inputs: SimInputs, policy: str, speedup: float) -> dict[str, Any]:
    """The prefill_weight (planner on) and then the fixed split, each by `_rank`, on `inputs` alone."""
    weights = WEIGHTS if policy in WEIGHTED else (inputs.recipe.router.prefill_weight,)
    by_weight = {w: simulate(_with_weight(inputs, w), SimConfig(router_policy=policy, planner=True),
                             time_scale=speedup) for w in weights}
    weight = max(by_weight, key=lambda w: _rank(by_weight[w]))
    tuned = _with_weight(inputs, weight)
    by_split = {s: simulate(tuned, SimConfig(router_policy=policy, planner=False, num_prefill=s[0],
                                             num_decode=s[1]), time_scale=speedup) for s in SPLITS}
    split = max(by_split, key=lambda s: _rank(by_split[s]))
    return {"prefill_weight": weight, "split": split,
            "weights": {str(w): _rank(r) for w, r in by_weight.items()},
            "splits": {f"{p}P/{d}D": _rank(r) for (p, d), r in by_split.items()}}


def _rank(report: dict[str, Any]) -> tuple[float, float]:
    """The one selection rule: goodput per GPU, then SLO attainment."""
    return (report["goodput_per_gpu"], report["slo_attainment"])


def _halves(trace: Trace) -> tuple[Trace, Trace]:
    """First half (tuning) and second half (reporting, arrivals from 0) of a trace."""
    half = len(trace.requests) // 2
    second = trace.requests[half:]
    start = second[0].arrival_s
    shifted = tuple(replace(r, arrival_s=r.arrival_s - start) for r in second)
    return replace(trace, requests=trace.requests[:half]), replace(trace, requests=shifted)


def _with_weight(inputs: SimInputs, weight: float) -> SimInputs:
    recipe = inputs.recipe
    return replace(inputs, recipe=replace(recipe, router=replace(recipe.router, prefill_weight=weight)))


if __name__ == "__main__":
    main()
