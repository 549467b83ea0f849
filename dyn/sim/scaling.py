"""The simulated fleet under the planner: ticks, scaling actions, launches, flips and drains.

A mixin of Simulation (dyn.sim.cluster): the daemon's side of the simulation,
in virtual time. Each tick closes the observation window, asks the live
planner (`slo_planner`) for a step, and turns it into actions with the daemon's
`scaling_actions`; new workers are placed with `place_one`.
"""

from __future__ import annotations

from typing import Any

from dyn.planner.actions import counts_of, scaling_actions
from dyn.planner.policy import ScalingAction, WorkerView
from dyn.sim.config import Tick
from dyn.sim.errors import SimError
from dyn.sim.worker import SimWorker
from dyn.topology.placement import Placement, WorkerPlacement, place_one


class SimScaling:
    """Worker lifecycle of Simulation: placed, started, flipped between roles, drained, stopped."""

    def _tick(self, _: Any) -> None:
        queued = sum(j.todo_tokens for w in self.workers.values() if w.role == "prefill"
                     for j in (*w.waiting, *w.prefilling))
        running = sum(len(w.prefilling) + len(w.decoding) for w in self.workers.values()
                      if w.role in ("decode", "both") and w.state == "ready")  # the live num_running
        window = self._window.close(self.now, self._num_waiting(), queued, running)
        views = self._views()
        current = counts_of(views)
        step = self.planner.plan(window, current, self.now)
        self.decisions.extend(step.decisions)
        for action in scaling_actions(step, views, current, disaggregated=self.disagg):
            self._apply(action)
        if self.domains:
            self.domains.refresh()
        self.ticks.append(Tick(self.now, self._ready_counts(), self._gpus_held(), self._window.last))
        self._push(self.now + self.recipe.planner.interval_s, "tick", None)

    # ---- actions -----------------------------------------------------------------------------

    def _apply(self, action: ScalingAction) -> None:
        """What the daemon does for an action, in virtual time: a flip lets the worker finish its
        requests under the old role first; a stop drains it."""
        if action.kind == "add":
            self._launch(action.role or "decode")
            return
        worker = self.workers[action.worker_id or ""]
        if action.kind == "set_role":
            worker.state, worker.flip_to = "flipping", action.role
        else:
            worker.state = "draining"
        self._maybe_retire(worker)

    def _launch(self, role: str) -> None:
        used = Placement(tuple(self.placements[w.id] for w in self.workers.values() if w.state != "stopped"),
                         self.topology.head)
        if role == "decode" and self.recipe.group("decode") is None:
            role = "both"
        wp = place_one(self.topology, self.recipe, role, used)
        self._add_worker(wp, ready_s=self.now + self.config.startup_s)

    def _maybe_retire(self, worker: SimWorker) -> None:
        if worker.state not in ("draining", "flipping") or not worker.is_idle:
            return
        if worker.state == "flipping":
            worker.role, worker.flip_to, worker.state = worker.flip_to or worker.role, None, "ready"
            worker._load = None  # its load names its role
            worker.profile = self.profile.role(worker.role)
            return
        worker.state, worker.stopped_s = "stopped", self.now
        worker.cache.clear()
        if self.domains is not None:
            self.domains.remove_worker(worker)
        else:
            self.router.remove_worker(worker.id)

    def _add_worker(self, wp: WorkerPlacement, ready_s: float) -> None:
        group = self.recipe.group(wp.role)  # type: ignore[arg-type]
        if wp.id in self.workers:
            raise SimError(f"worker id {wp.id} placed twice", field="workers")
        role = self.profile.role(wp.role)
        worker = SimWorker(wp.id, wp.role, max(wp.num_gpus, 1), wp.nvlink_domain, role,
                           self.block_size, launched_s=self.now, ready_s=ready_s,
                           max_queue=group.max_queue if group else 256,
                           kv_blocks=role.num_kv_blocks * self.recipe.model.block_size // self.block_size)
        self.workers[wp.id], self.placements[wp.id] = worker, wp
        if self.domains is not None:
            self.domains.add_worker(worker, wp.nvlink_domain or wp.node)
        if ready_s <= self.now:
            worker.state = "ready"
        else:
            self._push(ready_s, "ready", worker)

    def _views(self) -> list[WorkerView]:
        """The workers as the daemon's policy sees its slots. A flipping worker already shows its
        new role, ready (the daemon flips a slot in place), while it finishes old-role requests."""
        views = []
        for w in self.workers.values():
            if w.state == "stopped":
                continue
            role, state = (w.flip_to or w.role, "ready") if w.state == "flipping" else (w.role, w.state)
            views.append(WorkerView(w.id, role, "", (), state, {"in_flight": float(w.num_jobs + w.incoming)}))
        return views

    def _ready_counts(self) -> dict[str, int]:
        out = {"prefill": 0, "decode": 0, "starting": 0, "draining": 0}
        for w in self.workers.values():
            if w.state == "ready":
                out["decode" if w.role == "both" else w.role] += 1
            elif w.state in ("starting", "draining", "flipping"):
                out["starting" if w.state == "starting" else "draining"] += 1
        return out

    def _gpus_held(self) -> int:
        return sum(w.num_gpus for w in self.workers.values() if w.state != "stopped")

    def _num_waiting(self) -> int:
        return sum(len(w.waiting) for w in self.workers.values())
