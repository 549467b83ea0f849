"""Planner target -> worker actions: the one translation the daemon and the simulator share.

`SloPlanner.plan` answers in counts per role; `scaling_actions` turns that
answer into flips, launches and stops on named workers. The live daemon feeds
it its process slots (as `WorkerView`s); the simulator feeds it views of its
simulated workers, so both pick the same victims by the same rule.
"""

from __future__ import annotations

from dyn.planner.policy import Counts, PlanStep, ScalingAction, WorkerView

COUNTED_STATES = frozenset({"pending", "launching", "starting", "loading", "ready", "failed"})
"""States that count toward a role's current size (a failed worker is being relaunched)."""


def counts_of(workers: list[WorkerView]) -> Counts:
    """Workers per planner role that count toward the current size ("both" counts as decode)."""
    n = {"prefill": 0, "decode": 0}
    for w in workers:
        if w.role != "frontend" and w.state in COUNTED_STATES:
            n["decode" if w.role == "both" else w.role] += 1
    return Counts(n["prefill"], n["decode"])


def scaling_actions(step: PlanStep, workers: list[WorkerView], current: Counts, *,
                    disaggregated: bool) -> list[ScalingAction]:
    """Flips first (ready workers of the losing role, least loaded first), then launches or stops
    until each role meets `step.target`. Aggregated: launches are "both" workers."""
    actions: list[ScalingAction] = []
    taken: set[str] = set()
    counts = {"prefill": current.prefill, "decode": current.decode}
    for d in step.decisions:
        if d.action != "flip" or d.role is None:
            continue
        loser = "decode" if d.role == "prefill" else "prefill"
        for w in least_loaded(workers, loser, taken, ready_only=True)[: d.num_workers]:
            taken.add(w.id)
            counts[loser] -= 1
            counts[d.role] += 1
            actions.append(ScalingAction("set_role", w.id, d.role, d.reason))
    for role in ("prefill", "decode"):
        name = role if disaggregated else "both"
        reason = next((d.reason for d in step.decisions if d.role == role and d.action != "flip"), "")
        diff = step.target.get(role) - counts[role]
        for _ in range(max(diff, 0)):
            actions.append(ScalingAction("add", None, name, reason))
        if diff < 0:
            for w in least_loaded(workers, role, taken, ready_only=False)[: -diff]:
                taken.add(w.id)
                actions.append(ScalingAction("remove", w.id, w.role, reason))
    return actions


def least_loaded(workers: list[WorkerView], role: str, taken: set[str], *, ready_only: bool) -> list[WorkerView]:
    """Candidates to flip or stop, cheapest first: not yet ready, then fewest requests held."""
    pool = [w for w in workers if w.id not in taken and (w.role == role or (role == "decode" and w.role == "both"))
            and (w.state == "ready" if ready_only else w.state in COUNTED_STATES)]
    return sorted(pool, key=lambda w: (w.state == "ready", w.metrics.get("in_flight", 0.0)
                                       + w.metrics.get("num_running", 0.0), w.id))
