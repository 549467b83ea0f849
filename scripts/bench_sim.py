"""Compare our router + planner with baseline routers and fixed prefill/decode splits in `dyn sim`.

For each trace: our KV router with the SLO planner; each baseline router with the recipe's
fixed counts; and fixed splits (KV router, planner off) over a grid, keeping the best by
goodput per GPU. Prints one table (markdown) and optionally writes all reports as JSON.

    .venv/bin/python scripts/bench_sim.py --max-requests 3000 --speedup 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyn.sim.cluster import SimConfig  # noqa: E402
from dyn.sim.run import load_inputs, simulate  # noqa: E402

TRACES = {"mooncake-conv": "mooncake/conversation_trace.jsonl",
          "azure-conv": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv",
          "azure-code": "azure-llm-2023/AzureLLMInferenceTrace_code.csv"}
BASELINES = ("round-robin", "least-loaded", "dynamo", "sglang", "llm-d")
SPLITS = ((4, 14), (8, 12), (12, 10), (16, 8))
"""(prefill tp2, decode tp4): 64..72 GPUs of the 72."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces-dir", default=str(ROOT.parent / "shared/traces"))
    parser.add_argument("--trace", action="append", choices=sorted(TRACES), help="default: all")
    parser.add_argument("--topology", default=str(ROOT / "topologies/gb200-nvl72.yaml"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes/llama-3.1-70b-nvl72.yaml"))
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--speedup", type=float, default=1.0, help="arrival compression")
    parser.add_argument("--json", dest="json_out", help="write every report here")
    args = parser.parse_args()
    rows, reports = [], {}
    for name in args.trace or list(TRACES):
        inputs = load_inputs(args.topology, args.recipe, Path(args.traces_dir) / TRACES[name],
                             max_requests=args.max_requests)
        runs = {"kv + planner": SimConfig(router_policy="kv", planner=True)}
        runs.update({f"{p} (fixed)": SimConfig(router_policy=p, planner=False) for p in BASELINES})
        runs.update({f"kv split {p}P/{d}D": SimConfig(router_policy="kv", planner=False, num_prefill=p,
                                                     num_decode=d) for p, d in SPLITS})
        results = {label: simulate(inputs, cfg, time_scale=args.speedup) for label, cfg in runs.items()}
        best = max((k for k in results if k.startswith("kv split")), key=lambda k: results[k]["goodput_per_gpu"])
        for label, r in results.items():
            if label.startswith("kv split") and label != best:
                continue
            rows.append((name, label + (" (best split)" if label == best else ""), r))
        reports[name] = results
        print(f"# {name}: {inputs.profile.method} profile, speedup {args.speedup}, "
              f"{results['kv + planner']['requests']} requests", file=sys.stderr)
    print("| trace | config | SLO attainment | goodput/GPU (req/GPU-s) | GPU-s | mean GPUs | hit rate | TTFT p90 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, r in rows:
        print(f"| {name} | {label} | {r['slo_attainment']:.1%} | {r['goodput_per_gpu']:.5f} | "
              f"{r['gpu_seconds']:.0f} | {r['mean_gpus']:.1f} | {(r['prefix_hit_rate'] or 0):.1%} | "
              f"{r['ttft_ms']['p90']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
