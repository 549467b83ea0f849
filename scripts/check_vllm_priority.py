"""dyn's request priority through a real vLLM engine: which of three queued requests finishes first.

One sequence at a time (max_batch_size 1), three requests queued before the
first step: dyn priority 0, -1 (a speculative prefill's) and 5 (an agent
hint). With the scheduling policy dyn sets (priority) they must finish 5, 0,
-1; with vLLM's default fcfs, in arrival order. Not a unit test because a
vLLM engine start costs ~25 s here; tests/engine/test_vllm_args.py checks
the mapping itself.

    .venv/bin/python scripts/check_vllm_priority.py --model DIR [--policy fcfs]

Measured here (SmolLM2-135M bf16, CPU): priority -> ['high', 'low', 'spec'];
fcfs -> ['low', 'spec', 'high'].
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory (dyn model pull smollm2 DIR)")
    parser.add_argument("--policy", choices=("priority", "fcfs"), default="priority",
                        help="fcfs: set vLLM's default through model.engine_args, to see the difference")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from dyn.config.loader import parse_recipe
    from dyn.engine.backend import EngineRequest, SamplingParams
    from dyn.engine.factory import create_engine
    from dyn.engine.profiling import engine_env_for

    engine_args = "  engine_args: {scheduling_policy: fcfs}\n" if args.policy == "fcfs" else ""
    recipe = parse_recipe(f"name: priority\nmodel:\n  path: {os.path.abspath(args.model)}\n  engine: vllm\n"
                          f"  device: cpu\n  block_size: 32\n  max_context: 512\n{engine_args}workers:\n"
                          "  both: {max_batch_size: 1, max_num_batched_tokens: 256, kv_memory_gib: 1,"
                          " cpu_threads: 1}\n",
                          "priority.yaml")
    group = recipe.workers[0]
    with engine_env_for(recipe.model, group, "cpu"):
        engine = create_engine(recipe.model, group, device="cpu", cpu_threads=1)
    try:
        for rid, priority in (("low", 0), ("spec", -1), ("high", 5)):
            engine.add_request(EngineRequest(rid, list(range(50, 90)), SamplingParams(max_tokens=2, ignore_eos=True),
                                             priority=priority))
        finished = []
        while engine.has_work():
            finished += [out.request_id for out in engine.step() if out.finished]
    finally:
        engine.close()
    expected = ["high", "low", "spec"] if args.policy == "priority" else ["low", "spec", "high"]
    print(f"{args.policy}: finished in order {finished} ({'as expected' if finished == expected else 'UNEXPECTED'})")
    return 0 if finished == expected else 1


if __name__ == "__main__":
    sys.exit(main())
