"""Routing across many NVLink domains in the simulator: one live Router per domain, a balancer
in front (dyn.router.domains), as a multi-rack site runs them (docs/scale.md).

Each domain's Router is the live one, fed only its own workers' KV events, and
chooses among only its own workers: the candidates per request stay ~20 at any
site size. A prefill/decode pair normally shares the domain; only when the
chosen domain has no prefill worker taking work is a prefill worker borrowed
from the next domain in the request's ring order (the prompt's KV then crosses
the scale-out network to the decode worker: counted as a cross-domain hand-off).
"""

from __future__ import annotations

from typing import Callable

from dyn.config.recipe import Recipe
from dyn.router.domains import DomainBalancer
from dyn.router.errors import NoWorkerError
from dyn.router.events import KvEventBatch
from dyn.router.router import Router
from dyn.router.types import RouteChoice, RouteHints, RouteRequest
from dyn.sim.worker import SimWorker

MAX_DOMAINS_TRIED = 3
"""Domains asked in turn when every decode worker of the first is at its queue limit."""


class DomainRouting:
    def __init__(self, recipe: Recipe, domains: list[str], block_size: int,
                 make_router: Callable[[int], Router], *, affinity_tokens: int, slack: float) -> None:
        self.block_size = block_size
        self.disagg = recipe.mode == "disaggregated"
        self.routers = {name: make_router(i) for i, name in enumerate(domains)}
        self.balancer = DomainBalancer(domains, block_size=block_size,
                                       affinity_tokens=max(affinity_tokens, block_size), slack=slack)
        self.members: dict[str, list[SimWorker]] = {name: [] for name in domains}
        self.in_flight: dict[str, int] = {name: 0 for name in domains}
        """Requests whose decode worker is in the domain, not yet finished."""
        self.num_decoders: dict[str, int] = {name: 0 for name in domains}
        self.total_in_flight = 0
        self.total_decoders = 0
        self._unit_of: dict[str, str] = {}

    def add_worker(self, worker: SimWorker, unit: str) -> None:
        """`unit`: the worker's NVLink domain, or its node when it has none (dyn.config.scaling)."""
        if unit not in self.members:
            raise KeyError(f"worker {worker.id} is in no known domain ({unit})")
        self.members[unit].append(worker)
        self._unit_of[worker.id] = unit

    def refresh(self) -> None:
        """Recount accepting decode workers per domain (after launches, drains, flips)."""
        for name, workers in self.members.items():
            self.num_decoders[name] = sum(1 for w in workers if w.is_accepting and w.role in ("decode", "both"))
            workers[:] = [w for w in workers if w.state != "stopped"]
        self.total_decoders = sum(self.num_decoders.values())

    def route(self, req_hashes: list[int], num_tokens: int, now: float) -> tuple[str, RouteChoice]:
        """(domain, choice); raises NoWorkerError when the first domains tried are all full."""
        mean = self.total_in_flight / max(self.total_decoders, 1)
        domain = self.balancer.choose(req_hashes, self._load, mean)
        request = RouteRequest(req_hashes, num_tokens, RouteHints())
        err: NoWorkerError | None = None
        for name in self._tries(domain, req_hashes):
            loads = [w.load() for w in self.members[name] if w.is_accepting]
            decode = [ld for ld in loads if ld.role in ("decode", "both")]
            if not decode:
                continue
            prefill = [ld for ld in loads if ld.role == "prefill"]
            if self.disagg and not prefill:
                prefill = self._borrow_prefill(req_hashes, name)
            try:
                choice = self.routers[name].route(request, prefill, decode, now, disaggregated=self.disagg)
            except NoWorkerError as exc:
                err = exc
                continue
            return name, choice
        raise err or NoWorkerError("no decode worker in the domains tried", role="decode", reasons={})

    def _tries(self, first: str, req_hashes: list[int]):
        """The chosen domain, then (only if asked for: rare) the next ones of the key's order."""
        yield first
        tried = 1
        for name in self.balancer.order(self.balancer.key(req_hashes)):
            if tried >= MAX_DOMAINS_TRIED:
                return
            if name != first:
                tried += 1
                yield name

    def started(self, domain: str) -> None:
        self.in_flight[domain] += 1
        self.total_in_flight += 1

    def ended(self, domain: str) -> None:
        self.in_flight[domain] -= 1
        self.total_in_flight -= 1

    def apply_events(self, worker: SimWorker, batch: KvEventBatch) -> None:
        self.routers[self._unit_of[worker.id]].apply_events(batch)

    def remove_worker(self, worker: SimWorker) -> None:
        self.routers[self._unit_of[worker.id]].remove_worker(worker.id)

    def _load(self, name: str) -> float:
        return self.in_flight[name] / max(self.num_decoders[name], 1)

    def _borrow_prefill(self, req_hashes: list[int], home: str) -> list:
        for name in self.balancer.order(self.balancer.key(req_hashes)):
            if name == home:
                continue
            prefill = [w.load() for w in self.members[name] if w.is_accepting and w.role == "prefill"]
            if prefill:
                return prefill
        return []
