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
import logging
import os
import signal
import time

import zmq
import zmq.asyncio

from dyn.config.process import ProcessConfig
from dyn.control.client import ControlClient, EssentialTasks, wait_event
from dyn.control.keys import load_process_keys
from dyn.control.messages import Command
from dyn.control.sockets import Security, SharedContext, batch_io_context
from dyn.engine.backend import Backend
from dyn.errors import EngineError
from dyn.kv.disk_tier import DiskTier
from dyn.kv.host_tier import HostTier
from dyn.metrics.server import MetricsServer
from dyn.metrics.worker import worker_registry
from dyn.worker.engine_loop import STEP_LIMIT_S, EngineLoop, sweep_expired
from dyn.worker.handoff import KvHandoff
from dyn.worker.inline_loop import InlineEngineLoop
from dyn.worker.kv_publisher import KvEventPublisher
from dyn.worker.process_metrics import ProcessMetrics
from dyn.worker.process_startup import build_tiers, create_engine_for, load_files, start_handoff, start_vllm_bridge
from dyn.worker.request_server import RequestServer
from dyn.worker.telemetry import CpuMeter, GpuTelemetry, RateMeter
from dyn.worker.weights import (WeightReport, compute_key, corrupt_hook_blocks, find_peers, make_fill,
                                process_age_s, publish_manifest)

log = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 1.0
"""How often expired KV blocks (retention and tier TTLs) are dropped, with removal events."""
PEER_WAIT_S = 120.0
"""weights.source: peer: longest wait for a worker still loading the same weights."""


class WorkerProcess(ProcessMetrics):
    def __init__(self, config: ProcessConfig, *, own_signals: bool = True,
                 detokenizers: dict | None = None, shared: SharedContext | None = None) -> None:
        self.config = config
        self.own_signals = own_signals
        """SIGTERM/SIGINT stop this worker (False: a host handles them for all it runs)."""
        self.detokenizers = detokenizers
        """Tokenizers already loaded in this process, shared by the workers it hosts."""
        self.shared = shared
        """The ZMQ context of the process hosting this worker (None: a context of its own)."""
        self._stop = asyncio.Event()
        self.essential = EssentialTasks(self._stop)
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
        recipe, topology = load_files(cfg)
        group = recipe.group(cfg.role) or recipe.workers[0]
        keys = load_process_keys(cfg.keys_path) if cfg.keys_path else None
        if self.shared is None:
            # (a mock engine steps on the event loop; a real one computes on threads of its own)
            ctx = batch_io_context() if recipe.model.engine == "mock" else zmq.asyncio.Context()
            security = Security.from_keys(keys)
        else:
            ctx, security = self.shared.ctx, self.shared.security(keys)
        aio = asyncio.get_running_loop()
        if self.own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                aio.add_signal_handler(sig, self.stop)

        self.security = security
        self.server = RequestServer(ctx, cfg.bind_host, security, None, max_waiting=group.max_queue,
                                    process_id=cfg.process_id)
        self.kv_events = KvEventPublisher(ctx, cfg.bind_host, security, cfg.process_id)
        self.server.kv_snapshot = self.kv_events.snapshot
        tasks = [self.essential.start(self.server.serve(), "request plane"),
                 self.essential.start(self.kv_events.run(), "KV event publisher")]
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
                self.engine = await asyncio.to_thread(create_engine_for, recipe, group, cfg, fill,
                                                      self.detokenizers)
            except Exception as exc:  # report why, then exit non-zero
                log.error("engine failed to load: %s", exc)
                self.load_error = str(exc)
                if self.control:
                    self.control.set_state("failed")
                    await asyncio.sleep(min(1.0, cfg.heartbeat_interval_s))
                return 1
            self.engine.set_kv_event_listener(self.kv_events.listener)
            self.kv_bridge = start_vllm_bridge(self.engine, self.kv_events.listener)
            self.tiers = build_tiers(recipe, topology, cfg, self.engine.block_bytes, self.kv_events.listener)
            if self.tiers is not None:
                self.engine.set_lower_tier(self.tiers)
            sink = _log_finished(self.server.on_outputs)
            if self.engine.steps_in_interpreter:
                self.loop = InlineEngineLoop(self.engine, sink, each_step=recipe.model.mock_stream == "per_step")
            else:
                self.loop = EngineLoop(self.engine, sink)
            if recipe.model.engine == "vllm":
                from dyn.worker.vllm_handoff import VllmHandoff

                self.handoff = VllmHandoff(self.loop, pull_timeout_s=recipe.shuttle.pull_timeout_s)
            else:
                self.handoff = await start_handoff(ctx, security, recipe, topology, cfg, self.engine, self.loop)
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
            tasks.append(asyncio.create_task(self._serve_weights(recipe, topology, cfg, security, ctx)))
            await self._wait_stop()
        finally:
            await self._shutdown(tasks, security, ctx)
        return 1 if self.loop.fatal_error or self.essential.error else 0

    def stop(self) -> None:
        """Begin the shutdown: stop accepting, drain, exit (as the daemon's stop command does)."""
        self._stop.set()

    async def _wait_stop(self) -> None:
        while not self._stop.is_set():
            if not self.loop.is_alive:
                log.error("engine loop died: %r", self.loop.fatal_error)
                return
            if (busy_s := self.loop.busy_s()) > STEP_LIMIT_S:
                self.loop.fatal_error = EngineError(f"one engine step has run for {busy_s:.0f} s (limit "
                                                    f"{STEP_LIMIT_S:.0f} s): the engine is stuck")
                log.error("%s; exiting for the daemon to relaunch this worker", self.loop.fatal_error)
                return
            await wait_event(self._stop, 1.0)

    async def _shutdown(self, tasks: list[asyncio.Task], security: Security, ctx) -> None:
        self.server.accepting = False
        if self.control:
            self.control.set_state("stopping")
            await asyncio.sleep(0)
        alive = self.loop is not None and self.loop.is_alive
        if not await self.server.wait_drained(self.config.drain_grace_s if alive else 0):
            await self.server.fail_all("worker shut down before the request finished")
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
        if self.shared is None:  # (else the host closes them once every worker it runs has ended)
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

    async def _serve_weights(self, recipe, topology, cfg: ProcessConfig, security: Security, ctx) -> None:
        """Once ready: publish the manifest and offer this worker's weights to starting peers."""
        from dyn.shuttle import SenderConfig
        from dyn.shuttle.path import may_use_nixl
        from dyn.shuttle.transports.nixl import is_available as nixl_available
        from dyn.weights.server import WeightServer

        arena = getattr(getattr(getattr(self.engine, "runner", None), "model", None), "arena", None)
        if arena is None or not self.weights.key:
            return
        try:
            manifest = await publish_manifest(arena, self.weights, cache_dir=cfg.run_dir,
                                              engine=recipe.model.engine)
            nixl = may_use_nixl(topology, recipe.shuttle.transport, nixl_available=nixl_available())
            transports = SenderConfig.from_spec(recipe.shuttle, address="", cuda_available=recipe.model.device == "cuda",
                                                nixl_available=nixl).transports
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


def _log_finished(sink):
    """issue 8: one JSON log line per finished request, tagged with its id (`dyn logs --request`)."""
    def on_outputs(outputs) -> None:
        for out in outputs:
            if out.finished:
                log.info("request finished: %s", out.error or out.finish_reason,
                         extra={"request_id": out.request_id})
        sink(outputs)
    return on_outputs


def _replace_role(cfg: ProcessConfig, role: str) -> ProcessConfig:
    import dataclasses

    return dataclasses.replace(cfg, role=role)


async def _set_on(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
