"""Recipe + placement -> vLLM engine arguments, and the commands of a group wider than one tray.

No vLLM import here: `dyn plan` shows exactly what a worker will run on a
head node that has no vLLM installed, and tests cover the mapping.

Field map (recipe -> vLLM EngineArgs):
    model.path / name            -> model / served_model_name
    model.dtype                  -> dtype
    model.block_size             -> block_size
    model.max_context            -> max_model_len
    model.enable_prefix_caching  -> enable_prefix_caching
    model.gpu_memory_utilization -> gpu_memory_utilization
    workers.R.tp                 -> tensor_parallel_size (GPUs: CUDA_VISIBLE_DEVICES of the placement)
    workers.R.max_batch_size     -> max_num_seqs
    workers.R.max_num_batched_tokens -> max_num_batched_tokens
    workers.R.kv_memory_gib      -> kv_cache_memory_bytes (GPU) / VLLM_CPU_KVCACHE_SPACE (CPU)
    model.engine_args            -> passed through (checked against EngineArgs)
    mode: disaggregated          -> kv_transfer_config: NixlConnector (kv_buffer_device cpu on CPU)
    (always)                     -> scheduling_policy: priority (engine_args may set fcfs)

Priority: dyn's request priority (agent hints, speculative prefills) is
"higher runs first", as in the torch engine's scheduler; vLLM's is "lower
value first" and is ignored unless scheduling_policy is "priority" (fcfs
drops it silently). So every vLLM worker gets the priority policy, and each
request goes in as vllm_priority(dyn priority) = -priority. Ties keep
arrival order in both engines; under KV pressure vLLM preempts the
lowest-priority running request, as the torch engine does.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

from dyn.config.recipe import ModelSpec, WorkerGroup

CPU_BLOCK_MULTIPLE = 32
"""vLLM's CPU attention kernel takes block sizes that are multiples of 32."""
DEFAULT_CPU_KV_GIB = 1
"""CPU KV space when the recipe gives no kv_memory_gib (vLLM's own default is 4 GiB)."""


@dataclass(frozen=True)
class MultiNode:
    """vLLM's multi-node mode (mp backend): one process per tray, rank 0 hosts the engine."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class NodeCommand:
    """What runs on one tray of a multi-tray group."""

    node: str
    gpus: tuple[int, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    in_process: tuple[str, ...] = ()
    """Rank 0: the engine the dyn worker hosts, as the `vllm serve` arguments it equals."""

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        line = (env + " " if env else "") + shlex.join(self.argv)
        if self.in_process:
            line += "   # hosts in-process: vllm serve " + shlex.join(self.in_process)
        return line


MAX_LORAS_PER_BATCH = 4
"""vLLM's max_loras (adapters in one batch) unless engine_args sets it: each slot holds GPU memory."""


def engine_kwargs(spec: ModelSpec, group: WorkerGroup, *, device: str, disaggregated: bool = False,
                  kv_events_endpoint: str | None = None, multinode: MultiNode | None = None) -> dict[str, Any]:
    """EngineArgs keyword arguments for one worker of `group`."""
    kwargs: dict[str, Any] = {
        "model": spec.path,
        "served_model_name": [spec.served_name],
        "dtype": spec.dtype,
        "block_size": spec.block_size,
        "max_model_len": spec.max_context,
        "enable_prefix_caching": spec.enable_prefix_caching,
        "tensor_parallel_size": group.tp,
        "max_num_seqs": group.max_batch_size,
        "max_num_batched_tokens": group.max_num_batched_tokens,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "scheduling_policy": "priority",
    }
    if device != "cpu" and group.kv_memory_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(group.kv_memory_gib * 2**30)
    if device == "cpu":
        kwargs["enforce_eager"] = True  # no CUDA graphs; torch.compile on CPU costs minutes per start
    if disaggregated:  # kv_both: see serves_either_role
        kwargs["kv_transfer_config"] = {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                        "kv_buffer_device": "cpu" if device == "cpu" else "cuda",
                                        "kv_load_failure_policy": "recompute"}
    if kv_events_endpoint is not None:
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": kv_events_endpoint, "topic": "kv-events",
                                      "replay_endpoint": kv_events_endpoint + "-replay"}
    if multinode is not None:
        kwargs.update(nnodes=multinode.nnodes, node_rank=multinode.node_rank,
                      master_addr=multinode.master_addr, master_port=multinode.master_port,
                      distributed_executor_backend="mp")
    if spec.lora_adapters:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = min(len(spec.lora_adapters), MAX_LORAS_PER_BATCH)
    kwargs.update(dict(spec.engine_args))
    return kwargs


def serves_either_role(kwargs: dict[str, Any]) -> bool:
    """Whether an engine built from `kwargs` can both hand KV out and pull it in.

    Prefill and decode workers of a disaggregated recipe all get NixlConnector
    with kv_role "kv_both": one engine serves prefill_only requests (it keeps
    their blocks for a remote pull) and remote decodes (it pulls). So the
    planner flips a vLLM worker's role in place, weights and KV cache kept,
    as it does a torch worker. A one-sided role (kv_producer / kv_consumer),
    or no connector at all, could not: such a worker is relaunched instead.
    """
    config = kwargs.get("kv_transfer_config")
    return isinstance(config, dict) and config.get("kv_role") == "kv_both"


def vllm_priority(priority: int) -> int:
    """vLLM's priority for dyn's: dyn runs higher first, vLLM runs lower first."""
    return -priority


def engine_env(group: WorkerGroup, *, device: str, gpus: tuple[int, ...] = (),
               cpu_threads: int | None = None) -> dict[str, str]:
    """Environment a vLLM worker process needs (set before vLLM is imported)."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if device == "cpu":
        gib = group.kv_memory_gib if group.kv_memory_gib is not None else DEFAULT_CPU_KV_GIB
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(gib)))
        # Shared CPU nodes: never pin OpenMP threads to cores other workers use.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        # No torch.compile on CPU (the model already runs eager): vLLM compiles small sampler
        # kernels on first use, the first request with logprobs took ~25 s here with the C++
        # compiler running, and a node without one would fail that request.
        env["TORCH_COMPILE_DISABLE"] = "1"
        if cpu_threads:
            env["OMP_NUM_THREADS"] = str(cpu_threads)
        if group.tp == 1:
            # The model runs on the worker's engine thread (vLLM's in-process executor, which a
            # tp=1 GPU worker has anyway) instead of an executor process that vLLM's CPU platform
            # would spawn: one vLLM import and one process less per worker, and no executor
            # process spinning a core between steps (89-106% measured, bench_vllm_kv_wait.py).
            # Measured here: a profiled engine start 47 -> 34 s, a disaggregated test
            # deployment with its reference run 138 -> 84 s.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """`vllm serve` flags for EngineArgs keyword arguments (dicts as JSON, lists repeated)."""
    import json

    flags: list[str] = []
    for key, value in kwargs.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def lora_flags(spec: ModelSpec) -> list[str]:
    """`vllm serve`'s --lora-modules for the recipe's adapters (the dyn worker hosting the engine
    loads them by name; they are no EngineArgs)."""
    return ["--lora-modules", *(f"{name}={path}" for name, path in spec.lora_adapters)] if spec.lora_adapters else []


def multinode_commands(spec: ModelSpec, group: WorkerGroup, shards: tuple[tuple[str, tuple[int, ...]], ...],
                       *, master_addr: str, master_port: int, disaggregated: bool,
                       cpu_threads: int | None = None, worker_id: str = "worker") -> list[NodeCommand]:
    """One command per tray of a group that spans trays; rank 0 is the dyn worker itself.

    Rank 0 hosts vLLM's engine in the dyn worker (request plane, KV events,
    heartbeats); ranks 1.. run `vllm serve --headless`, which joins rank 0's
    torch.distributed group at master_addr:master_port and only executes the
    model (vLLM's documented multi-node mode with the mp backend, no Ray).
    """
    commands = []
    for rank, (node, gpus) in enumerate(shards):
        in_process: tuple[str, ...] = ()
        multinode = MultiNode(len(shards), rank, master_addr, master_port)
        kwargs = engine_kwargs(spec, group, device="cuda", disaggregated=disaggregated, multinode=multinode)
        env = engine_env(group, device="cuda", gpus=gpus, cpu_threads=cpu_threads)
        if rank == 0:
            argv: tuple[str, ...] = ("dyn", "worker", "--config", f"{worker_id}.json")
            in_process = (spec.path, *cli_flags(kwargs), *lora_flags(spec))
        else:
            argv = ("vllm", "serve", spec.path, "--headless", *cli_flags(kwargs))
        commands.append(NodeCommand(node, tuple(gpus), argv, tuple(sorted(env.items())), in_process))
    return commands


MASTER_PORT_BASE = 29500
"""torch.distributed rendezvous port of a multi-tray group: base + the worker's index."""


def worker_commands(recipe: Any, topology: Any, worker: Any, index: int) -> list[NodeCommand]:
    """Exactly what runs for one placed vLLM worker: one command, or one per tray of a wide group."""
    group = recipe.group(worker.role)
    disaggregated = recipe.mode == "disaggregated"
    device = "cpu" if not worker.gpus else "cuda"
    if not worker.extra_nodes:
        kwargs = engine_kwargs(recipe.model, group, device=device, disaggregated=disaggregated)
        env = engine_env(group, device=device, gpus=tuple(worker.gpus), cpu_threads=worker.cpu_threads)
        argv = ("dyn", "worker", "--config", f"{worker.id}.json")
        return [NodeCommand(worker.node, tuple(worker.gpus), argv, tuple(sorted(env.items())),
                            (recipe.model.path, *cli_flags(kwargs), *lora_flags(recipe.model)))]
    master = topology.node(worker.node)
    # Other trays connect to rank 0: its bind address, or its SSH address when that is loopback.
    loopback = master.bind_address.startswith("127.") or master.bind_address == "localhost"
    address = master.ssh.address if loopback and not master.ssh.is_local else master.bind_address
    return multinode_commands(recipe.model, group, worker.shards, master_addr=address,
                              master_port=MASTER_PORT_BASE + index, disaggregated=disaggregated,
                              cpu_threads=worker.cpu_threads, worker_id=worker.id)
