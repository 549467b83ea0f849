"""The discrete-event simulation: arrivals, worker steps and KV handoffs (planner ticks: dyn.sim.scaling).

Virtual time jumps from event to event (a heap). The router is the live
frontend's `dyn.router.Router` (its `route`, as `Routing.choose_workers` calls
it), fed the workers' real KV events; the planner is the daemon's
(`slo_planner`) and its answers become actions through the daemon's
`scaling_actions`; new workers are placed with `place_one`. Only what virtual
time needs is a model here: the engines (SimWorker, SimKvCache), the
observation window, and how long launches, flips and drains take.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import replace
from typing import Any, Iterable, Iterator

from dyn.config.recipe import Recipe
from dyn.config.scaling import domain_units, scale_to_topology
from dyn.config.topology import Topology
from dyn.engine.profile import EngineProfile
from dyn.planner.policy import Decision
from dyn.planner.slo_policy import slo_planner
from dyn.router.errors import NoWorkerError
from dyn.router.events import KvEventBatch
from dyn.router.types import RouteHints, RouteRequest
from dyn.shuttle.errors import PathError
from dyn.shuttle.path import Endpoint, LinkSpeeds, choose_path
from dyn.sim.config import SimConfig, Tick, make_router, with_counts
from dyn.sim.domain_routing import DomainRouting
from dyn.sim.errors import SimError
from dyn.sim.scaling import SimScaling
from dyn.sim.window import ObservationWindow
from dyn.sim.worker import SimWorker
from dyn.sim.workload import SimRequest
from dyn.topology.placement import WorkerPlacement, place


class Simulation(SimScaling):
    def __init__(self, topology: Topology, recipe: Recipe, profile: EngineProfile,
                 requests: Iterable[SimRequest], config: SimConfig = SimConfig()) -> None:
        self.topology, self.profile, self.config = topology, profile, config
        self.recipe = with_counts(scale_to_topology(recipe, topology), config.num_prefill, config.num_decode)
        self.requests: list[SimRequest] = []
        """Requests that have arrived (all of them after `run`); streamed from `requests`."""
        self._source: Iterator[SimRequest] = iter(requests)
        self.disagg = self.recipe.mode == "disaggregated"
        self._path_cache: dict[tuple, float] = {}
        model_block = self.recipe.model.block_size
        self.block_size = config.block_tokens or model_block
        if self.block_size % model_block:
            raise SimError(f"must be a multiple of model.block_size {model_block}, got {self.block_size}",
                           field="block_tokens")
        self.router = make_router(self.recipe, config.router_policy, config.seed, self.block_size)
        units = domain_units(topology)
        self.domains: DomainRouting | None = None
        if config.domain_routing:
            self.domains = DomainRouting(
                self.recipe, units, self.block_size,
                lambda i: make_router(self.recipe, config.router_policy, config.seed + i, self.block_size),
                affinity_tokens=config.domain_affinity_tokens, slack=config.domain_slack)
            self.router = self.domains.routers[units[0]]
        self.kv_event_batches = 0
        self.kv_event_hashes = 0
        """KV events published (batches; block hashes in them): the frontends' event load."""
        self.num_handoffs = 0
        self.cross_domain_handoffs = 0
        self.cross_domain_bytes = 0
        enabled = self.recipe.planner.enabled if config.planner is None else config.planner
        self.recipe = replace(self.recipe, planner=replace(self.recipe.planner, enabled=enabled))
        self.planner = slo_planner(self.recipe, topology, profile)
        self.workers: dict[str, SimWorker] = {}
        self.placements: dict[str, WorkerPlacement] = {}
        self.ticks: list[Tick] = []
        self.decisions: list[Decision] = []
        self.itl_steps: dict[float, int] = {}
        """Decode step duration (to the microsecond) -> sequence-steps of that duration: the
        token-level ITL distribution in memory bounded by its distinct values, not by the run."""
        self.now = 0.0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._order = itertools.count()
        self._window = ObservationWindow()
        self._left = 0
        for wp in place(topology, self.recipe).workers:
            self._add_worker(wp, ready_s=0.0)
        if self.domains:
            self.domains.refresh()

    # ---- running -----------------------------------------------------------------------------

    def run(self) -> float:
        """Run to the last request; returns the virtual end time."""
        self._next_arrival()
        interval = self.recipe.planner.interval_s
        self._push(interval, "tick", None)
        handlers = {"arrive": self._route, "step": self._step_done, "ready": self._ready,
                    "import": self._import, "tick": self._tick}
        while self._heap and (self._left or self._source is not None):
            self.now, _, kind, data = heapq.heappop(self._heap)
            handlers[kind](data)
        for w in self.workers.values():
            if w.stopped_s is None:
                w.stopped_s = self.now
        return self.now

    def gpu_seconds(self) -> float:
        return sum(((w.stopped_s if w.stopped_s is not None else self.now) - w.launched_s) * w.num_gpus
                   for w in self.workers.values())

    # ---- events ------------------------------------------------------------------------------

    def _route(self, req: SimRequest) -> None:
        if req.notes.get("first_try") is None:
            req.notes["first_try"] = self.now
            self._window.arrive(req)
            self._next_arrival()
        try:
            if self.domains is not None:
                domain, (pre, dec, _) = self.domains.route(req.block_hashes, req.input_tokens, self.now)
                req.notes["domain"] = domain
            else:
                loads = [w.load() for w in self.workers.values() if w.is_accepting]
                request = RouteRequest(req.block_hashes, req.input_tokens, RouteHints())
                pre, dec, _ = self.router.route(request, [ld for ld in loads if ld.role == "prefill"],
                                                [ld for ld in loads if ld.role in ("decode", "both")], self.now,
                                                disaggregated=self.disagg)
        except NoWorkerError:
            if self.now - req.notes["first_try"] >= self.config.max_wait_s:
                self._fail(req, "overloaded: no worker could take the request")
            else:
                req.retries += 1
                self._push(self.now + self.config.retry_s, "arrive", req)
            return
        target = self.workers[pre or dec]
        if not (target.fits(req) and self.workers[dec].fits(req)):
            self._fail(req, "prompt + output exceed a worker's KV pool")
            return
        req.prefill_worker, req.decode_worker = pre or dec, dec
        if self.domains is not None:
            self.domains.started(req.notes["domain"])
        if pre:
            self.workers[dec].incoming += 1
        target.submit(req, prefill=True, decode_here=pre is None)
        self._kick(target)

    def _step_done(self, data: tuple[SimWorker, int]) -> None:
        worker, epoch = data
        if epoch != worker.step_epoch:
            return  # a macro step cut short by new work: its own, earlier event did the work
        worker.busy = False
        if worker.step_decodes:
            key = round(worker.step_s, 6)
            self.itl_steps[key] = self.itl_steps.get(key, 0) + worker.step_decodes * worker.step_count
        outcome = worker.finish_step()
        for job in outcome.first_tokens:
            job.req.first_token_s = self.now
            self._window.first_token(job.req)
        for job in outcome.handoffs:
            self._handoff(worker, job.req)
        for job in outcome.finished:
            self._finish(job.req)
        self._flush_events(worker)
        self._kick(worker)
        self._maybe_retire(worker)

    def _handoff(self, source: SimWorker, req: SimRequest) -> None:
        dest = self.workers[req.decode_worker or ""]
        if req.output_tokens <= 1:
            dest.incoming -= 1
            self._finish(req)
            self._maybe_retire(dest)
            return
        missing = len(req.block_hashes) - dest.cache.lookup(req.block_hashes)
        tokens = missing * self.block_size + req.input_tokens % self.block_size
        gbps = self._path_gbps(source.id, dest.id)
        num_bytes = tokens * self.profile.kv_bytes_per_token
        self.num_handoffs += 1
        # Leaving a domain: a different NVLink domain, or (no NVLink) a different node.
        if (source.domain or self.placements[source.id].node) != (dest.domain or self.placements[dest.id].node):
            self.cross_domain_handoffs += 1
            self.cross_domain_bytes += num_bytes
        self._push(self.now + num_bytes / (gbps * 1e9), "import", req)

    def _path_gbps(self, source_id: str, dest_id: str) -> float:
        """Hand-off bandwidth from the live system's path table (cached per pair of places)."""
        src, dst = self.placements[source_id], self.placements[dest_id]
        key = (src.node, src.gpus, dst.node, dst.gpus)
        gbps = self._path_cache.get(key)
        if gbps is None:
            c = self.config
            try:
                choice = choose_path(self.topology, Endpoint(src.node, src.gpus), Endpoint(dst.node, dst.gpus),
                                     self.recipe.shuttle.transport, cuda_available=self.recipe.model.device != "cpu",
                                     nixl_available=c.nixl, fabric_available=c.fabric_handles)
            except PathError as exc:
                raise SimError(f"KV hand-off {source_id} -> {dest_id}: {exc}", field="shuttle") from None
            gbps = LinkSpeeds(nvlink_gbps=c.nvlink_gbps, network_gbps=c.network_gbps, tcp_gbps=c.tcp_gbps).of(choice)
            self._path_cache[key] = gbps
        return gbps

    def _import(self, req: SimRequest) -> None:
        dest = self.workers[req.decode_worker or ""]
        dest.incoming -= 1
        dest.submit(req, prefill=False, decode_here=True)
        self._kick(dest)

    def _ready(self, worker: SimWorker) -> None:
        if worker.state == "starting":
            worker.state = "ready"
            if self.domains:
                self.domains.refresh()


    def _kick(self, worker: SimWorker) -> None:
        """Start the worker's next step; if it is in a macro step, new work cuts it short."""
        if worker.state in ("starting", "stopped"):
            return
        if worker.busy:
            cut = worker.cut_at(self.now - worker.step_start_s)
            if cut is not None:
                self._push(worker.step_start_s + cut, "step", (worker, worker.step_epoch))
            return
        duration = worker.start_step()
        if duration is None:
            return
        worker.busy = True
        worker.step_start_s = self.now
        self._push(self.now + duration, "step", (worker, worker.step_epoch))

    # ---- helpers -----------------------------------------------------------------------------

    def _flush_events(self, worker: SimWorker) -> None:
        events = worker.cache.take_events()
        if events:
            self.kv_event_batches += 1
            self.kv_event_hashes += sum(len(e.block_hashes) for e in events)
            batch = KvEventBatch(worker.id, worker.event_seq, events)
            if self.domains is not None:
                self.domains.apply_events(worker, batch)
            else:
                self.router.apply_events(batch)
            worker.event_seq += 1

    def _finish(self, req: SimRequest) -> None:
        req.finish_s = self.now
        self._window.finish(req)
        self._done(req)

    def _fail(self, req: SimRequest, why: str) -> None:
        req.error = why
        self._done(req)

    def _done(self, req: SimRequest) -> None:
        self._left -= 1
        if self.domains is not None and req.decode_worker is not None:
            self.domains.ended(req.notes["domain"])
        req.block_hashes = []  # a long run keeps every request's result, not its prompt

    def _next_arrival(self) -> None:
        """Requests are pulled one at a time: only the next arrival waits in the heap."""
        if self._source is None:
            return
        req = next(self._source, None)
        if req is None:
            self._source = None
            return
        self.requests.append(req)
        self._left += 1
        self._push(req.arrival_s, "arrive", req)

    def _push(self, when: float, kind: str, data: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._order), kind, data))

