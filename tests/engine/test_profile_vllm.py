"""`dyn profile` on a real vLLM engine (SmolLM2-135M on CPU): one engine start, a sane fitted profile.

The profile must be measured the way a vLLM worker runs (the recipe's KV
space and threads), fit a step model whose costs grow with the work, and be
what the planner then sizes the deployment from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyn.config.loader import load_recipe, load_topology
from dyn.engine.profile import load_profile, profile_path
from dyn.planner.slo_policy import SloPolicy, choose_policy
from e2e.smollm2 import smollm2_checkpoint

pytest.importorskip("vllm")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DYN = str(Path(sys.executable).with_name("dyn"))
BLOCK, BUDGET, BATCH = 32, 256, 8


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe file, profiled once by `dyn profile` (written next to it, as the planner expects)."""
    tmp = tmp_path_factory.mktemp("vllm-profile")
    model = smollm2_checkpoint(tmp_path_factory)
    recipe = tmp / "smollm2-vllm-profile.yaml"
    recipe.write_text(
        f"name: smollm2-vllm-profile\nmodel:\n  path: {model}\n  name: smollm2\n  engine: vllm\n  device: cpu\n"
        f"  dtype: float32\n  block_size: {BLOCK}\n  max_context: 512\n"
        f"workers:\n  both:\n    max_batch_size: {BATCH}\n    max_num_batched_tokens: {BUDGET}\n"
        "    kv_memory_gib: 1\n    cpu_threads: 1\nplanner:\n  enabled: true\n  ttft_ms: 2000\n  itl_ms: 200\n")
    result = subprocess.run([DYN, "profile", "-r", str(recipe)], capture_output=True, text=True, timeout=540,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"wrote {profile_path(recipe)}" in result.stdout
    return recipe


def test_profile_of_a_vllm_worker_grows_with_the_work_and_holds_the_recipe_kv_space(measured: Path) -> None:
    recipe = load_recipe(measured)
    profile = load_profile(profile_path(measured), recipe)  # also checks it describes this recipe
    assert (profile.engine, profile.method, set(profile.roles)) == ("vllm", "measured", {"both"})
    role = profile.roles["both"]
    t = role.timing
    # Prefill: min of 3 steps per length, lengths 1/8..1 of the step budget.
    lengths = [n for n, _ in role.prefill_samples]
    assert lengths == [32, 64, 128, 192, 256]
    assert all(s > 0 for _, s in role.prefill_samples)
    assert role.prefill_samples[-1][1] > role.prefill_samples[0][1]
    assert t.prefill_s_per_token > 0
    assert role.prefill_step_s(BUDGET) > role.prefill_step_s(BLOCK)
    # Decode: batches 1, 4, 8 at two context lengths; a fuller batch costs more per step.
    assert sorted({b for b, _, _ in role.decode_samples}) == [1, 4, BATCH]
    assert all(s > 0 for _, _, s in role.decode_samples)
    assert t.decode_base_s > 0
    assert role.decode_step_s(BATCH, BATCH * 256) > role.decode_step_s(1, 256)
    # KV capacity is vLLM's own block count for kv_memory_gib: 1 (the worker's VLLM_CPU_KVCACHE_SPACE),
    # not vLLM's 4 GiB default: float32 K and V of every layer, BLOCK tokens a block.
    config = json.loads((Path(recipe.model.path) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    block_bytes = BLOCK * config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4
    assert t.num_kv_blocks == 2**30 // block_bytes


def test_planner_sizes_vllm_workers_from_the_measured_profile(measured: Path) -> None:
    recipe = load_recipe(measured)
    choice = choose_policy(recipe, load_topology(ROOT / "topologies/local.yaml"), str(measured))
    assert isinstance(choice.policy, SloPolicy), choice.note
    assert str(profile_path(measured)) in choice.note
