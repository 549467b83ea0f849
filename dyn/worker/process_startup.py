"""What `dyn worker` builds at startup: the engine, the KV hand-off, tiers and vLLM's event bridge.

Functions of WorkerProcess.run (dyn.worker.process), each from the recipe, the
topology and the process config alone; none keeps state of its own.
"""

from __future__ import annotations

import asyncio
import os
import re

from dyn.config.process import ProcessConfig
from dyn.control.sockets import Security
from dyn.engine.backend import Backend
from dyn.kv.disk_tier import DiskTier
from dyn.kv.events import KvEventListener
from dyn.kv.host_tier import HostTier
from dyn.worker.engine_loop import EngineLoop
from dyn.worker.handoff import KvHandoff

VLLM_KV_EVENTS_SOCKET = re.compile(r"^dyn-vllm-kv-(\d+)(-replay)?$")
"""The unix sockets of a vLLM worker's KV events (publisher and replay), named by its pid."""


def load_files(cfg: ProcessConfig):
    """The recipe and topology the launcher passed inline (parsed here, with their source names for errors)."""
    from dyn.config.loader import parse_recipe, parse_topology

    return (parse_recipe(cfg.recipe_text, cfg.recipe_source),
            parse_topology(cfg.topology_text, cfg.topology_source))


def create_engine_for(recipe, group, cfg: ProcessConfig, fill_weights=None, detokenizers=None) -> Backend:
    """The engine for this worker's group on the recipe's device, restricted to the placement's GPUs
    (`detokenizers`: see dyn.engine.factory.create_engine)."""
    from dyn.engine.factory import create_engine

    device = recipe.model.device
    if device == "auto":
        device = "cuda" if cfg.gpus else "cpu"
    if device == "cuda" and cfg.gpus:
        if "SLURM_STEP_ID" in os.environ:  # Slurm listed the step's GPUs: pick the placement's among them
            from dyn.launch.slurm import step_visible_devices

            os.environ["CUDA_VISIBLE_DEVICES"] = step_visible_devices(cfg.gpus, os.environ) or ""
        else:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, cfg.gpus)))
    kv_bytes = int(group.kv_memory_gib * 2**30) if group.kv_memory_gib else None
    vllm_kwargs = vllm_setup(recipe, group, cfg, device) if recipe.model.engine == "vllm" else None
    return create_engine(recipe.model, group, device=device, kv_memory_bytes=kv_bytes,
                         cpu_threads=cfg.cpu_threads, fill_weights=fill_weights, vllm_kwargs=vllm_kwargs,
                         detokenizers=detokenizers)


def vllm_setup(recipe, group, cfg: ProcessConfig, device: str) -> dict:
    """vLLM's environment (before it is imported) and engine arguments for this worker."""
    from dyn.engine.vllm_args import engine_env, engine_kwargs

    for key, value in engine_env(group, device=device, gpus=tuple(cfg.gpus), cpu_threads=cfg.cpu_threads).items():
        os.environ.setdefault(key, value)
    # vLLM's records become this worker's JSON lines (dyn.logs), tagged and filtered like its own:
    # vLLM's handler would print its text format (without file or process name under dyn.logs'
    # shortcuts) and wrap every record of the process in its own record factory.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    disaggregated = recipe.mode == "disaggregated"
    if disaggregated:  # NIXL's handshake side channel: one port per worker on a shared node
        from dyn.worker.port_claim import claim_port

        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = cfg.bind_host
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(claim_port(cfg.bind_host))
        # Before vLLM's NixlConnector makes its agent (in this process at tp=1): its progress
        # thread polls for UCX events instead of spinning a core (measured 0.98 -> 0.02 idle).
        from dyn.shuttle.transports.nixl import load_api

        load_api()
    # KV events over IPC: no port, reachable only on this node. In the temp dir, not the run
    # directory: a unix socket path is capped at 107 bytes. A SIGKILLed worker leaves its sockets
    # (and vLLM's rendezvous file): removed here for workers no longer running.
    import tempfile

    remove_vllm_files_of_dead_workers(tempfile.gettempdir())
    events = f"ipc://{tempfile.gettempdir()}/dyn-vllm-kv-{os.getpid()}"
    return engine_kwargs(recipe.model, group, device=device, disaggregated=disaggregated,
                         kv_events_endpoint=events)


def remove_vllm_files_of_dead_workers(directory: str) -> None:
    """What vLLM workers no longer running left in `directory`: KV-event sockets, rendezvous files."""
    from dyn.engine.vllm_rendezvous import remove_stores_of_dead_processes
    from dyn.launch.local import remove_files_of_dead_processes

    remove_files_of_dead_processes(directory, VLLM_KV_EVENTS_SOCKET)
    remove_stores_of_dead_processes(directory)


async def start_handoff(ctx, security: Security, recipe, topology, cfg: ProcessConfig, engine: Backend,
                         loop: EngineLoop) -> KvHandoff:
    """Sender and receiver for every prefill/decode worker, so a role flip needs no restart;
    pulls take the transport of the topology path between the two workers. Where that path
    can be NIXL, both ends start their agents now rather than on the first hand-off."""
    from dyn.shuttle import Endpoint, ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender
    from dyn.shuttle.path import may_use_nixl
    from dyn.shuttle.ring import sweep_stale_segments
    from dyn.shuttle.transports.nixl import is_available as nixl_available
    from dyn.worker.kv_path import TopologyPaths

    if recipe.mode != "disaggregated" or engine.block_bytes <= 0:
        return KvHandoff(loop, sender=None, receiver=None, pull_timeout_s=recipe.shuttle.pull_timeout_s)
    sweep_stale_segments()
    cuda = engine.kv_on_cuda  # where the pool is, not what the placement names: a mock on GPUs holds host memory
    # NIXL where a path of this topology can take it (then the path table sees it installed)
    nixl = may_use_nixl(topology, recipe.shuttle.transport, nixl_available=nixl_available())
    paths = TopologyPaths(topology, Endpoint(cfg.node, tuple(cfg.gpus)), recipe.shuttle.transport,
                          cuda_available=cuda, nixl_available=nixl)
    handoff = KvHandoff(loop, sender=None, receiver=None, paths=paths, pull_timeout_s=recipe.shuttle.pull_timeout_s)
    sender_config = SenderConfig.from_spec(recipe.shuttle, address=f"tcp://{cfg.bind_host}:0",
                                           cuda_available=cuda, nixl_available=nixl,
                                           node=cfg.node, gpus=tuple(cfg.gpus))
    sender = ShuttleSender(engine.block_bytes, config=sender_config, security=security, ctx=ctx,
                           on_release=handoff.on_release)
    await sender.start()
    handoff.sender = sender
    handoff.receiver = ShuttleReceiver(config=ReceiverConfig.from_spec(recipe.shuttle), security=security,
                                       ctx=ctx)
    if nixl:
        await asyncio.to_thread(handoff.receiver.prepare, ["nixl"])
    return handoff


def start_vllm_bridge(engine: Backend, listener: KvEventListener):
    """vLLM workers: translate vLLM's KV events into dyn's (None for other engines)."""
    endpoints = getattr(engine, "kv_events_endpoints", None)
    if endpoints is None:
        return None
    from dyn.worker.vllm_kv_bridge import VllmKvBridge

    bridge = VllmKvBridge(endpoints[0], endpoints[1], engine.block_size, listener)
    bridge.start()
    return bridge


def build_tiers(recipe, topology, cfg: ProcessConfig, block_bytes: int,
                 listener: KvEventListener) -> HostTier | None:
    """Host-memory tier over an optional disk tier, sized by the recipe (None: no tiers)."""
    spec = recipe.kv_tiers
    if block_bytes <= 0 or (spec.host_memory_gib <= 0 and spec.disk_gib <= 0):
        return None
    disk = None
    if spec.disk_gib > 0:
        node = topology.node(cfg.node)
        directory = os.path.join(node.kv_disk_path or os.path.join(cfg.run_dir, "kv"), cfg.deployment)
        disk = DiskTier(directory, block_bytes, int(spec.disk_gib * 2**30), name=cfg.process_id,
                        ttl_s=spec.ttl_s, listener=listener)
    return HostTier(block_bytes, int(spec.host_memory_gib * 2**30), below=disk, ttl_s=spec.ttl_s,
                    listener=listener)
