"""`dyn frontend`: the HTTP API process, wired to the daemon and the workers.

Startup: serve HTTP, register with the daemon (role "frontend", addresses
http + metrics), then apply every `update_workers` push to the worker pool.
Shutdown (SIGTERM, stop command, daemon lost): stop taking requests, let
in-flight ones finish for a grace period, then close every socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from dyn.config.process import ProcessConfig
from dyn.config.recipe import Recipe
from dyn.control.keys import load_process_keys
from dyn.control.messages import Command
from dyn.control.sockets import Security, batch_io_context
from dyn.engine.profile import EngineProfile, ProfileError, load_profile, mock_profile, profile_path
from dyn.errors import ConfigError
from dyn.frontend.admission import Admission
from dyn.frontend.app import ApiSettings, Frontend, add_site, build_app, start_site, stop_listening
from dyn.frontend.auth import load_api_keys
from dyn.frontend.balance import ConnectionBalancer
from dyn.frontend.breaker import BreakerBoard
from dyn.frontend.generate import Dispatcher
from dyn.frontend.kv_subscriber import KvEventSubscriber
from dyn.frontend.metrics import FrontendMetrics
from dyn.frontend.peers import PeerLoad
from dyn.frontend.routing import Routing
from dyn.frontend.reasoning import END as REASONING_END
from dyn.frontend.sampling_defaults import log_sampling_defaults, resolve_sampling_defaults
from dyn.frontend.text import TextTokenizer, checkpoint_dir, load_tokenizer
from dyn.frontend.workers import WorkerLimits, WorkerPool

log = logging.getLogger(__name__)


def build_frontend(recipe: Recipe, pool: WorkerPool, *, tokenizer: TextTokenizer | None = None,
                   policy: str | None = None, seed: int | None = None,
                   stall_timeout_s: float | None = None, profile: EngineProfile | None = None,
                   breakers: BreakerBoard | None = None) -> Frontend:
    """Assemble the HTTP frontend of a recipe over an existing worker pool.

    `profile` (default: `find_profile(recipe)`) drives admission control and the
    stall deadlines; `stall_timeout_s` overrides router.stall_timeout_s.
    """
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    sampling = resolve_sampling_defaults(recipe.model.sampling_defaults, checkpoint_dir(recipe.model))
    log_sampling_defaults(sampling)
    _check_reasoning_parser(recipe, tokenizer)
    profile = profile or find_profile(recipe)
    admission = (Admission(profile, recipe.planner.ttft_ms / 1000.0)
                 if profile is not None and recipe.router.admission else None)
    routing = Routing(recipe, pool, policy=policy, seed=seed, breakers=breakers, admission=admission)
    metrics = FrontendMetrics(pool, routing.router, routing.breakers)
    dispatcher = Dispatcher(pool, routing, tokenizer, metrics, max_context=recipe.model.max_context,
                            stall_timeout_s=stall_timeout_s or recipe.router.stall_timeout_s,
                            max_migrations=recipe.router.max_migrations, profile=profile,
                            relaunch_wait_s=recipe.router.relaunch_wait_s,
                            log_prompts=recipe.frontend.log_prompts, kv_tiers=recipe.kv_tiers)
    settings = ApiSettings(recipe.model.served_name, recipe.model.max_context,
                           recipe.frontend.max_prompt_tokens, recipe.auth.share_cache_across_tenants,
                           recipe.frontend.log_prompts, sampling.defaults, recipe.model.reasoning_parser,
                           recipe.model.tool_call_parser,
                           adapters=tuple(name for name, _ in recipe.model.lora_adapters))
    keys = load_api_keys(recipe.auth.api_keys_file) if recipe.auth.api_keys_file else None
    return Frontend(settings, tokenizer, dispatcher, pool, metrics, api_keys=keys)


def _check_reasoning_parser(recipe: Recipe, tokenizer: TextTokenizer) -> None:
    """A reasoning parser on a model that cannot close its reasoning would make every answer reasoning."""
    parser = recipe.model.reasoning_parser
    if parser != "none" and tokenizer.token_id(REASONING_END) is None:
        raise ConfigError(f"reasoning_parser {parser}: the model's tokenizer has no {REASONING_END!r} token, so "
                          "its answers would never leave the reasoning", path=recipe.source,
                          line=recipe.line_of("model.reasoning_parser"), field="model.reasoning_parser",
                          hint="set reasoning_parser: none for a model that does not think in <think> tags")


def find_profile(recipe: Recipe) -> EngineProfile | None:
    """The engine profile next to the recipe file (`dyn profile` writes it), the mock engine's own
    timing model, or None (then no admission control, and stall deadlines assume a slow prefill)."""
    if recipe.model.engine == "mock":
        return mock_profile(recipe)
    if not recipe.source or recipe.source.startswith("<"):
        return None
    path = profile_path(recipe.source)
    if not path.exists():
        log.info("no engine profile at %s: admission control is off (run `dyn profile`)", path)
        return None
    try:
        return load_profile(path, recipe)
    except ProfileError as exc:
        log.warning("engine profile ignored, admission control is off: %s", exc)
        return None


def worker_limits(recipe: Recipe) -> dict[str, WorkerLimits]:
    return {g.role: WorkerLimits(g.max_batch_size, g.max_queue) for g in recipe.workers}


async def run_frontend(config: ProcessConfig) -> int:
    """Run until stopped; returns the exit code."""
    from dyn.config.loader import parse_recipe
    from dyn.control.client import ControlClient, EssentialTasks

    recipe = parse_recipe(config.recipe_text, config.recipe_source)
    # Each prompt is one encode on the event loop's thread (or one off-loop thread for a long one):
    # a thread pool per encode call would only add a hand-off to each (dyn.frontend.token_cache).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    host = config.extra.get("http_host", recipe.frontend.host)
    try:
        port = int(config.extra.get("http_port", recipe.frontend.port))
    except ValueError:
        raise ConfigError(f"extra.http_port must be an integer, got {config.extra['http_port']!r}",
                          path=config.process_id) from None
    ctx = batch_io_context()
    security = Security.from_keys(load_process_keys(config.keys_path) if config.keys_path else None)
    pool = WorkerPool(ctx, security, worker_limits(recipe))
    frontend = build_frontend(recipe, pool, policy=config.extra.get("router_policy"))
    stop = asyncio.Event()
    aio = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, stop.set)

    reuse_port = config.extra.get("reuse_port") == "1"
    runner, bound = await start_site(build_app(frontend), host, port, reuse_port=reuse_port)
    url = f"http://{host}:{bound}"
    # A replica that shares its port also listens on its own one: its metrics and a client
    # that must reach this replica (tests, dyn status) need an address no other replica answers.
    own_url = f"http://{host}:{await add_site(runner, host)}" if reuse_port else url
    log.info("frontend serving %s on %s%s", recipe.model.served_name, url,
             f" (shared port; this replica alone: {own_url})" if reuse_port else "")
    # The router's KV index follows the workers' KV events; snapshots ride the request plane.
    kv_events = KvEventSubscriber(ctx, security, frontend.dispatcher.routing.router, pool.request_snapshot)
    pool.on_snapshot = kv_events.on_snapshot
    essential = EssentialTasks(stop)
    tasks: list[asyncio.Task] = [essential.start(kv_events.run(), "KV event subscriber")]
    peers = None
    if recipe.frontend.replicas > 1:
        peers = PeerLoad(ctx, security, pool, config.process_id, config.bind_host)
        tasks.append(essential.start(peers.run(), "peer load"))
        if reuse_port:  # keep-alive clients spread over the replicas that share the port
            frontend.balancer = ConnectionBalancer(runner.server, url, bound, peers)
            frontend.metrics.open_connections.set_function(frontend.balancer.open_connections)
            tasks.append(essential.start(frontend.balancer.run(), "connection balancer"))
    control = None
    if config.daemon_address:
        control = ControlClient(ctx, daemon_address=config.daemon_address, security=security,
                                process_id=config.process_id, role="frontend", node=config.node,
                                heartbeat_interval_s=config.heartbeat_interval_s,
                                daemon_grace_s=config.daemon_grace_s)
        control.addresses = {"http": url, "replica": own_url, "metrics": own_url + "/metrics",
                             **({"load": peers.address} if peers is not None else {})}
        control.state = "ready"

        async def on_command(command: Command) -> None:
            await _apply_command(command, frontend, kv_events, stop, security, peers)

        async def metrics() -> tuple[dict[str, float], dict]:
            return _heartbeat_metrics(frontend), heartbeat_info(frontend, url)

        tasks.append(asyncio.create_task(control.run(on_command, metrics)))
        tasks.append(asyncio.create_task(_set_on(control.daemon_lost, stop)))
    try:
        await stop.wait()
    finally:
        frontend.accepting = False
        if control is not None:
            control.set_state("stopping")
        log.info("frontend stopping; %d requests in flight", frontend.pool.num_open_streams)
        if reuse_port:  # new connections to the shared port go to the other replicas from now on
            await stop_listening(runner, bound)
        await _wait_idle(frontend, config.drain_grace_s)
        await runner.shutdown()
        await runner.cleanup()
        log.info("frontend stopped")
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: on Python 3.11 a wait_for inside a task can swallow its cancellation.
            await asyncio.wait(tasks, timeout=1.0)
        kv_events.close()
        if peers is not None:
            peers.close()
        pool.close()
        if control is not None:
            control.close()
        security.stop()
        ctx.term()
    return 1 if essential.error else 0


async def _apply_command(command: Command, frontend: Frontend, kv_events: KvEventSubscriber,
                         stop: asyncio.Event, security: Security, peers: PeerLoad | None = None) -> None:
    if command.action == "update_workers":
        workers = command.args.get("workers")
        if not isinstance(workers, list):
            log.warning("update_workers without a workers list; ignored")
            return
        pool = frontend.pool
        before = {wid: h.address for wid, h in pool.workers.items()}
        pool.update(workers)
        relaunch_s = command.args.get("relaunch_s")
        if isinstance(relaunch_s, (int, float)) and not isinstance(relaunch_s, bool) and relaunch_s >= 0:
            pool.relaunch_s = float(relaunch_s)
        for wid, address in before.items():
            handle = pool.workers.get(wid)
            if handle is None or handle.address != address:  # gone, or relaunched: fresh cache and breaker
                frontend.dispatcher.routing.forget(wid)
        for wid in kv_events.worker_ids - set(pool.workers):
            kv_events.disconnect(wid)
        for wid, handle in pool.workers.items():
            if handle.kv_events_address is not None and handle.is_ready:
                await kv_events.connect(wid, handle.kv_events_address)
        replicas = command.args.get("frontends")
        if peers is not None and isinstance(replicas, dict):
            peers.update_peers({k: v for k, v in replicas.items() if isinstance(k, str) and isinstance(v, str)})
    elif command.action == "drain":
        frontend.accepting = False
    elif command.action == "stop":
        stop.set()
    elif command.action == "authorize":
        keys = command.args.get("public_keys", [])
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            security.authorizer.add(keys)


def heartbeat_info(frontend: Frontend, url: str) -> dict:
    """Heartbeat.info: the daemon shows `breakers` ({worker_id: closed|half_open|open}) in dyn status."""
    return {"role": "frontend", "url": url, "breakers": frontend.dispatcher.routing.breakers.states()}


def _heartbeat_metrics(frontend: Frontend) -> dict[str, float]:
    m = frontend.metrics
    return {"in_flight": float(frontend.pool.num_open_streams),
            "num_workers": float(len(frontend.pool.workers)),
            "requests_total": float(m.num_requests), "rejected_total": float(m.num_rejected),
            # expected output lengths from agent hints: the planner's decode demand
            "osl_requests_total": float(m.num_osl_requests), "osl_tokens_total": float(m.num_osl_tokens),
            "bad_messages": float(frontend.pool.bad.total),
            "migrations_total": frontend.metrics.migrations._value.get(),
            "open_breakers": float(sum(s != "closed" for s in
                                       frontend.dispatcher.routing.breakers.states().values())),
            # cumulative latency buckets: the SLO planner's measured TTFT/ITL per window
            **m.latency_buckets()}


async def _wait_idle(frontend: Frontend, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while frontend.pool.num_open_streams and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def _set_on(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
