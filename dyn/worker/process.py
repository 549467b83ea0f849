"""`dyn worker`: one engine on one GPU set (or the CPU), wired to the planes.

Startup: bind the request plane, register with the daemon (state "loading"),
load the engine off the event loop, then report "ready". Main loop: serve
requests and heartbeat. Shutdown (SIGTERM, stop command, daemon lost):
stop accepting, give in-flight requests a grace period, fail the rest
explicitly, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time

import zmq
import zmq.asyncio

from dyn.config.process import ProcessConfig
from dyn.control.client import ControlClient, wait_event
from dyn.control.keys import load_process_keys
from dyn.control.messages import Command
from dyn.control.sockets import Security
from dyn.engine.backend import Backend
from dyn.kv.disk_tier import DiskTier
from dyn.kv.events import KvEventListener
from dyn.kv.host_tier import HostTier
from dyn.metrics.server import MetricsServer
from dyn.metrics.worker import worker_registry
from dyn.worker.engine_loop import EngineLoop, sweep_expired
from dyn.worker.handoff import KvHandoff
from dyn.worker.kv_publisher import KvEventPublisher
from dyn.worker.request_server import RequestServer
from dyn.worker.telemetry import CpuMeter, GpuTelemetry, RateMeter, engine_rates, process_telemetry
from dyn.worker.weights import (WeightReport, compute_key, corrupt_hook_blocks, find_peers, make_fill,
                                process_age_s, publish_manifest)

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0
EXPIRY_SWEEP_S = 1.0
"""How often expired KV blocks (retention and tier TTLs) are dropped, with removal events."""
PEER_WAIT_S = 120.0
"""weights.source: peer: longest wait for a worker still loading the same weights."""


class WorkerProcess:
    def __init__(self, config: ProcessConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._started_at = time.monotonic()
        self.engine: Backend | None = None
        self.loop: EngineLoop | None = None
        self.server: RequestServer | None = None
        self.control: ControlClient | None = None
        self.tiers: HostTier | None = None
        self.handoff: KvHandoff | None = None
        self.load_error = ""
        self.weights = WeightReport()
        self.weight_server = None
        self.kv_bridge = None
        self._cpu = CpuMeter()
        # GPU telemetry and recent rates for heartbeats; the snapshot Prometheus scrapes.
        self._gpu = GpuTelemetry(tuple(config.gpus))
        self._rates = RateMeter()
        self._scraped: dict[str, float] = {}

    async def run(self) -> int:
        cfg = self.config
        recipe, topology = _load_files(cfg)
        group = recipe.group(cfg.role) or recipe.workers[0]
        ctx = zmq.asyncio.Context()
        security = Security.from_keys(load_process_keys(cfg.keys_path) if cfg.keys_path else None)
        aio = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio.add_signal_handler(sig, self._stop.set)

        self.security = security
        self.server = RequestServer(ctx, cfg.bind_host, security, None, max_waiting=group.max_queue,
                                    process_id=cfg.process_id)
        self.kv_events = KvEventPublisher(ctx, cfg.bind_host, security, cfg.process_id)
        self.server.kv_snapshot = self.kv_events.snapshot
        tasks = [asyncio.create_task(self.server.serve()), asyncio.create_task(self.kv_events.run())]
        self.metrics_server = MetricsServer(
            worker_registry(lambda: self._scraped, lambda: {"process": cfg.process_id, "role": self.config.role}),
            cfg.bind_host, refresh=self._refresh_scrape)
        await self.metrics_server.start()
        if cfg.daemon_address:
            self.control = ControlClient(ctx, daemon_address=cfg.daemon_address, security=security,
                                         process_id=cfg.process_id, role=cfg.role, node=cfg.node,
                                         gpus=cfg.gpus, heartbeat_interval_s=cfg.heartbeat_interval_s,
                                         daemon_grace_s=cfg.daemon_grace_s)
            self.control.addresses = {"request": self.server.address, "kv_events": self.kv_events.address,
                                      "metrics": self.metrics_server.url}
            self.control.state = "loading"
            tasks.append(asyncio.create_task(self.control.run(self._on_command, self._metrics)))
            tasks.append(asyncio.create_task(_set_on(self.control.daemon_lost, self._stop)))
        try:
            try:
                fill = await self._weights_plan(recipe, cfg, security)
                self.engine = await asyncio.to_thread(_create_engine, recipe, group, cfg, fill)
            except Exception as exc:  # report why, then exit non-zero
                log.error("engine failed to load: %s", exc)
                self.load_error = str(exc)
                if self.control:
                    self.control.set_state("failed")
                    await asyncio.sleep(min(1.0, cfg.heartbeat_interval_s))
                return 1
            self.engine.set_kv_event_listener(self.kv_events.listener)
            self.kv_bridge = _start_vllm_bridge(self.engine, self.kv_events.listener)
            self.tiers = _build_tiers(recipe, topology, cfg, self.engine.block_bytes, self.kv_events.listener)
            if self.tiers is not None:
                self.engine.set_lower_tier(self.tiers)
            self.loop = EngineLoop(self.engine, _log_finished(self.server.on_outputs))
            if recipe.model.engine == "vllm":
                from dyn.worker.vllm_handoff import VllmHandoff

                self.handoff = VllmHandoff(self.loop)
            else:
                self.handoff = await _start_handoff(ctx, security, recipe, topology, cfg, self.engine, self.loop)
            self.server.import_kv = self.handoff.import_and_decode
            self.server.export_kv = self.handoff.export
            self.server.attach(self.loop)
            self.loop.start()
            tasks.append(asyncio.create_task(sweep_expired(self.loop, EXPIRY_SWEEP_S)))
            self.weights.ready_s = process_age_s()
            if self.control:
                self.control.set_state("ready")
            log.info("worker %s ready in %.2fs (weights: %s, %.2fs): request plane %s", cfg.process_id,
                     self.weights.ready_s, self.weights.source or "n/a", self.weights.load_s, self.server.address)
            tasks.append(asyncio.create_task(self._serve_weights(recipe, cfg, security, ctx)))
            await self._wait_stop()
        finally:
            await self._shutdown(tasks, security, ctx)
        return 1 if self.loop.fatal_error else 0

    async def _wait_stop(self) -> None:
        while not self._stop.is_set():
            if not self.loop.is_alive:
                log.error("engine loop died: %r", self.loop.fatal_error)
                return
            await wait_event(self._stop, 1.0)

    async def _shutdown(self, tasks: list[asyncio.Task], security: Security, ctx) -> None:
        self.server.accepting = False
        if self.control:
            self.control.set_state("stopping")
            await asyncio.sleep(0)
        alive = self.loop is not None and self.loop.is_alive
        if not await self.server.wait_drained(SHUTDOWN_GRACE_S if alive else 0):
            await self.server.fail_all("worker shut down before the request finished")
        await self.server.flush()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.weight_server is not None:
            await self.weight_server.close()
        if self.handoff is not None:
            await self.handoff.close()
        if self.loop is not None:
            self.loop.stop()
        if self.kv_bridge is not None:
            self.kv_bridge.close()
            for endpoint in (self.kv_bridge.endpoint, self.kv_bridge.replay_endpoint):
                if endpoint and endpoint.startswith("ipc://"):  # vLLM leaves its socket files behind
                    with contextlib.suppress(OSError):
                        os.unlink(endpoint[len("ipc://"):])
        self.server.close()
        self.kv_events.close()
        await self.metrics_server.close()
        self._gpu.close()
        if self.tiers is not None and isinstance(self.tiers.below, DiskTier):
            self.tiers.below.close()
        if self.control:
            self.control.close()
        security.stop()
        ctx.term()

    async def _on_command(self, command: Command) -> None:
        log.info("command %s", command.action)
        if command.action == "drain":
            self.server.accepting = False
            self.control.set_state("draining")
        elif command.action == "stop":
            self._stop.set()
        elif command.action == "authorize":
            public_keys = command.args.get("public_keys", [])
            if isinstance(public_keys, list) and all(isinstance(k, str) for k in public_keys):
                self.security.authorizer.add(public_keys)
        elif command.action == "set_role":
            role = command.args.get("role")
            if role in ("prefill", "decode", "both"):
                self.config = _replace_role(self.config, role)

    async def _metrics(self) -> tuple[dict[str, float], dict]:
        """Heartbeat: cumulative engine figures, recent rates, process and GPU telemetry."""
        values = await self._engine_values()
        values.update(engine_rates(self._rates, values))
        if self.handoff is not None and not hasattr(self.handoff.stats, "pull_failures"):
            values.update({"kv_offers": self.handoff.stats.offers, "kv_pulls": self.handoff.stats.pulls,
                           "kv_local_fallbacks": self.handoff.stats.local_fallbacks})
        elif self.handoff is not None:
            h = self.handoff.stats
            values.update({"kv_offers": h.offers, "kv_pulls": h.pulls, "kv_pull_failures": h.pull_failures,
                           "kv_local_fallbacks": h.local_fallbacks, "kv_bytes_pulled": h.bytes_pulled,
                           "kv_pull_seconds": h.seconds_pulling})
            for path, num_bytes in h.bytes_by_transport.items():
                values[f"shuttle_bytes.{path}"] = float(num_bytes)
                seconds = h.seconds_by_transport.get(path, 0.0)
                values[f"shuttle_gbps.{path}"] = num_bytes / seconds / 1e9 if seconds > 0 else 0.0
        values.update(process_telemetry(self._cpu))
        values.update(self._gpu.sample())
        values.update(self._weight_values())
        info = {"role": self.config.role}
        if self.weights.source:
            info["weights"] = self.weights.info()
        if self.load_error:
            info["error"] = self.load_error
        elif not self._gpu.is_available and self.config.gpus:
            info["gpu_telemetry"] = self._gpu.reason
        return values, info

    async def _refresh_scrape(self) -> None:
        values = await self._engine_values()
        values.update(self._gpu.sample())
        values.update(self._weight_values())
        self._scraped = values

    def _weight_values(self) -> dict[str, float]:
        values = self.weights.metrics()
        if self.weight_server is not None:
            values["weights_served_bytes"] = float(self.weight_server.stats.num_bytes)
            values["weights_pacing_wait_seconds"] = self.weight_server.pacer.seconds_waited
        return values

    async def _weights_plan(self, recipe, cfg: ProcessConfig, security: Security):
        """torch engine: the fill_weights that streams from a live peer (None: read the checkpoint)."""
        if recipe.model.engine != "torch":
            return None
        self.weights.key = await asyncio.to_thread(compute_key, recipe, cfg.role)
        peers = []
        if self.control is not None:
            peers = await find_peers(self.control.ask, process_id=cfg.process_id, key=self.weights.key,
                                     source=recipe.weights.source, wait_s=PEER_WAIT_S)
        log.info("weights %s: %s", self.weights.key,
                 f"peers {[p.process_id for p in peers]}" if peers else "no live peer, reading the checkpoint")
        return make_fill(self.weights.key, peers, cache_dir=cfg.run_dir, security=security, report=self.weights)

    async def _serve_weights(self, recipe, cfg: ProcessConfig, security: Security, ctx) -> None:
        """Once ready: publish the manifest and offer this worker's weights to starting peers."""
        from dyn.shuttle import SenderConfig
        from dyn.shuttle.transports.nixl import is_available as nixl_available
        from dyn.weights.server import WeightServer

        arena = getattr(getattr(getattr(self.engine, "runner", None), "model", None), "arena", None)
        if arena is None or not self.weights.key:
            return
        try:
            manifest = await publish_manifest(arena, self.weights, cache_dir=cfg.run_dir,
                                              engine=recipe.model.engine)
            transports = SenderConfig.from_spec(recipe.shuttle, address="", cuda_available=recipe.model.device == "cuda",
                                                nixl_available=nixl_available()).transports
            server = WeightServer(arena, manifest, share=recipe.weights.peer_bandwidth_share,
                                  bind_host=cfg.bind_host, transports=transports, security=security, ctx=ctx,
                                  corrupt_once=corrupt_hook_blocks())
            await server.start()
        except Exception:  # serving peers is an extra: this worker keeps serving requests without it
            log.exception("cannot serve weights to peers")
            return
        self.weight_server = server
        self.weights.address = server.address
        log.info("serving weights %s to peers at %s", manifest.key, server.address)

    async def _engine_values(self) -> dict[str, float]:
        """Engine and request-plane figures; cumulative ones only grow (counters for Prometheus)."""
        if self.loop is None or not self.loop.is_alive:
            return {}
        stats, connector = await asyncio.wrap_future(self.loop.submit(
            lambda e: (e.stats(), dataclasses.asdict(e.connector) if hasattr(e, "connector") else {})))
        total = max(stats.num_kv_blocks_total, 1)
        values = {
            "num_running": stats.num_running, "num_waiting": stats.num_waiting,
            "kv_blocks_used": stats.num_kv_blocks_used, "kv_blocks_total": stats.num_kv_blocks_total,
            "kv_usage": stats.num_kv_blocks_used / total,
            "prefix_hit_blocks": stats.prefix_hit_blocks, "prefix_lookup_blocks": stats.prefix_lookup_blocks,
            "num_computed_tokens": stats.num_computed_tokens,
            "num_generated_tokens": stats.num_generated_tokens,
            "waiting_prefill_tokens": stats.num_waiting_prefill_tokens,
            "num_preemptions": stats.num_preemptions, "tier_hit_blocks": stats.num_tier_hit_blocks,
            "requests_total": self.server.requests_total, "cancels_total": self.server.cancels_total,
            "kv_events_published": self.kv_events.events_published,
            "in_flight": self.server.num_in_flight, "bad_messages": self.server.bad.total,
            "uptime_s": time.monotonic() - self._started_at,
        }
        # vLLM's KV connector (disaggregated vLLM workers): transfers, hits, fallbacks.
        values.update({f"kv_connector.{key}": value for key, value in connector.items()})
        if self.kv_bridge is not None:
            values.update({f"vllm_kv_events.{key}": value
                           for key, value in dataclasses.asdict(self.kv_bridge.stats).items()})
        if self.tiers is not None:
            values["kv_tier_blocks.host"] = len(self.tiers)
            below = self.tiers.below
            if below is not None and hasattr(below, "__len__"):
                values["kv_tier_blocks.disk"] = len(below)
        return {k: float(v) for k, v in values.items()}


def _load_files(cfg: ProcessConfig):
    from dyn.config.loader import parse_recipe, parse_topology

    return (parse_recipe(cfg.recipe_text, cfg.recipe_source),
            parse_topology(cfg.topology_text, cfg.topology_source))


def _create_engine(recipe, group, cfg: ProcessConfig, fill_weights=None) -> Backend:
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
    vllm_kwargs = _vllm_setup(recipe, group, cfg, device) if recipe.model.engine == "vllm" else None
    return create_engine(recipe.model, group, device=device, kv_memory_bytes=kv_bytes,
                         cpu_threads=cfg.cpu_threads, fill_weights=fill_weights, vllm_kwargs=vllm_kwargs)


def _vllm_setup(recipe, group, cfg: ProcessConfig, device: str) -> dict:
    """vLLM's environment (before it is imported) and engine arguments for this worker."""
    from dyn.engine.vllm_args import engine_env, engine_kwargs

    for key, value in engine_env(group, device=device, gpus=tuple(cfg.gpus), cpu_threads=cfg.cpu_threads).items():
        os.environ.setdefault(key, value)
    disaggregated = recipe.mode == "disaggregated"
    if disaggregated:  # NIXL's handshake side channel: one port per worker on a shared node
        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = cfg.bind_host
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_free_port(cfg.bind_host))
    # KV events over IPC in the worker's run directory: no port, reachable only on this node.
    import tempfile

    events = f"ipc://{tempfile.gettempdir()}/dyn-vllm-kv-{os.getpid()}"  # short: unix socket paths are capped
    return engine_kwargs(recipe.model, group, device=device, disaggregated=disaggregated,
                         kv_events_endpoint=events)


async def _start_handoff(ctx, security: Security, recipe, topology, cfg: ProcessConfig, engine: Backend,
                         loop: EngineLoop) -> KvHandoff:
    """Sender and receiver for every prefill/decode worker, so a role flip needs no restart;
    pulls take the transport of the topology path between the two workers."""
    from dyn.shuttle import Endpoint, ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender
    from dyn.shuttle.ring import sweep_stale_segments
    from dyn.shuttle.transports.nixl import is_available as nixl_available
    from dyn.worker.kv_path import TopologyPaths

    if recipe.mode != "disaggregated" or engine.block_bytes <= 0:
        return KvHandoff(loop, sender=None, receiver=None)
    sweep_stale_segments()
    cuda = recipe.model.device == "cuda" or (recipe.model.device == "auto" and bool(cfg.gpus))
    nixl = nixl_available()
    paths = TopologyPaths(topology, Endpoint(cfg.node, tuple(cfg.gpus)), recipe.shuttle.transport,
                          cuda_available=cuda, nixl_available=nixl)
    handoff = KvHandoff(loop, sender=None, receiver=None, paths=paths)
    sender_config = SenderConfig.from_spec(recipe.shuttle, address=f"tcp://{cfg.bind_host}:0",
                                           cuda_available=cuda, nixl_available=nixl,
                                           node=cfg.node, gpus=tuple(cfg.gpus))
    sender = ShuttleSender(engine.block_bytes, config=sender_config, security=security, ctx=ctx,
                           on_release=handoff.on_release)
    await sender.start()
    handoff.sender = sender
    handoff.receiver = ShuttleReceiver(config=ReceiverConfig.from_spec(recipe.shuttle), security=security,
                                       ctx=ctx)
    return handoff


def _start_vllm_bridge(engine: Backend, listener: KvEventListener):
    """vLLM workers: translate vLLM's KV events into dyn's (None for other engines)."""
    endpoints = getattr(engine, "kv_events_endpoints", None)
    if endpoints is None:
        return None
    from dyn.worker.vllm_kv_bridge import VllmKvBridge

    bridge = VllmKvBridge(endpoints[0], endpoints[1], engine.block_size, listener)
    bridge.start()
    return bridge


def _build_tiers(recipe, topology, cfg: ProcessConfig, block_bytes: int,
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


def _log_finished(sink):
    """issue 8: one JSON log line per finished request, tagged with its id (`dyn logs --request`)."""
    def on_outputs(outputs) -> None:
        for out in outputs:
            if out.finished:
                log.info("request finished: %s", out.error or out.finish_reason,
                         extra={"request_id": out.request_id})
        sink(outputs)
    return on_outputs


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _replace_role(cfg: ProcessConfig, role: str) -> ProcessConfig:
    import dataclasses

    return dataclasses.replace(cfg, role=role)


async def _set_on(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
