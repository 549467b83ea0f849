"""Recipe -> vLLM engine arguments, and the per-tray commands of a group wider than one tray."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dyn.config.loader import load_recipe, load_topology, parse_recipe
from dyn.engine.vllm_args import cli_flags, engine_env, engine_kwargs, vllm_priority, worker_commands
from dyn.topology.placement import place

ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _recipe(extra: str = "", mode: str = "aggregated", group: str = "both: {tp: 1}"):
    return parse_recipe(f"name: m\nmodel:\n  path: /models/x\n  name: x\n  engine: vllm\n  block_size: 32\n"
                        f"  max_context: 4096\n{extra}mode: {mode}\nworkers:\n  {group}\n", "r.yaml")


def test_recipe_fields_map_onto_engine_args() -> None:
    recipe = _recipe("  dtype: float16\n  enable_prefix_caching: false\n  gpu_memory_utilization: 0.8\n"
                     "  engine_args: {kv_cache_dtype: fp8}\n",
                     group="both: {tp: 4, max_batch_size: 96, max_num_batched_tokens: 1024, kv_memory_gib: 20}")
    kwargs = engine_kwargs(recipe.model, recipe.workers[0], device="cuda")
    assert kwargs == {"model": "/models/x", "served_model_name": ["x"], "dtype": "float16", "block_size": 32,
                      "max_model_len": 4096, "enable_prefix_caching": False, "tensor_parallel_size": 4,
                      "max_num_seqs": 96, "max_num_batched_tokens": 1024, "gpu_memory_utilization": 0.8,
                      "kv_cache_memory_bytes": 20 * 2**30, "kv_cache_dtype": "fp8",
                      "scheduling_policy": "priority"}


def test_priority_scheduling_is_on_and_dyn_priorities_map_onto_vllm_order() -> None:
    recipe = _recipe()
    assert engine_kwargs(recipe.model, recipe.workers[0], device="cpu")["scheduling_policy"] == "priority"
    fcfs = _recipe("  engine_args: {scheduling_policy: fcfs}\n")  # an operator may opt out
    assert engine_kwargs(fcfs.model, fcfs.workers[0], device="cpu")["scheduling_policy"] == "fcfs"
    # dyn: higher runs first (agent hint 5 > default 0 > speculative prefill -1); vLLM: lower first.
    dyn_order = [5, 1, 0, -1, -3]
    assert sorted(dyn_order, key=vllm_priority) == dyn_order
    assert vllm_priority(0) == 0


def test_cpu_workers_get_eager_mode_a_bounded_kv_space_and_no_thread_pinning() -> None:
    recipe = _recipe(mode="disaggregated", group="decode: {kv_memory_gib: 1.5}")
    group = recipe.workers[0]
    kwargs = engine_kwargs(recipe.model, group, device="cpu", disaggregated=True)
    assert kwargs["enforce_eager"] is True and "kv_cache_memory_bytes" not in kwargs
    assert kwargs["kv_transfer_config"] == {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                            "kv_buffer_device": "cpu", "kv_load_failure_policy": "recompute"}
    env = engine_env(group, device="cpu", cpu_threads=2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == "2" and "CUDA_VISIBLE_DEVICES" not in env
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # tp=1: the model on the engine thread
    wide = _recipe(mode="aggregated", group="both: {tp: 2}").workers[0]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(wide, device="cpu")
    assert engine_env(group, device="cuda", gpus=(4, 5))["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_deepseek_groups_wider_than_a_tray_run_vllm_multi_node_one_process_per_tray() -> None:
    topology = load_topology(ROOT / "topologies/gb200-nvl72.yaml")
    recipe = load_recipe(ROOT / "recipes/deepseek-r1-nvl72.yaml")
    placement = place(topology, recipe)
    index, decode = next((i, w) for i, w in enumerate(placement.workers) if w.role == "decode")
    commands = worker_commands(recipe, topology, decode, index)
    assert [c.node for c in commands] == [n for n, _ in decode.shards] and len(commands) == 4
    master = topology.node(decode.node).ssh.address
    rank0, *others = commands
    assert rank0.argv == ("dyn", "worker", "--config", f"{decode.id}.json")
    for rank, command in enumerate(commands):
        flags = list(command.in_process if rank == 0 else command.argv)
        assert _flag(flags, "--nnodes") == "4" and _flag(flags, "--node-rank") == str(rank)
        assert _flag(flags, "--master-addr") == master and _flag(flags, "--master-port") == str(29500 + index)
        assert _flag(flags, "--tensor-parallel-size") == "16" and "--enable-expert-parallel" in flags
        assert _flag(flags, "--distributed-executor-backend") == "mp"
        assert dict(command.env)["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, decode.shards[rank][1]))
    for command in others:
        assert command.argv[:4] == ("vllm", "serve", "/models/DeepSeek-R1", "--headless")


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_generated_flags_parse_back_to_the_same_engine_args_in_vllm() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    recipe = load_recipe(ROOT / "recipes/deepseek-r1-nvl72.yaml")
    kwargs = engine_kwargs(recipe.model, recipe.group("decode"), device="cuda", disaggregated=True)
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = EngineArgs.from_cli_args(parser.parse_args(["--model", kwargs["model"], *cli_flags(kwargs)]))
    for key, value in kwargs.items():
        got = getattr(parsed, key)
        if key == "kv_transfer_config":
            got = {k: getattr(got, k) for k in value}
        assert got == value, key


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]
