"""A Scaler wired to record its control commands instead of sending them (the fleet's I/O is the
caller's fake): shared by the scaling and role-flip tests."""

from __future__ import annotations

from pathlib import Path

from dyn.config.loader import load_topology
from dyn.config.recipe import Recipe
from dyn.control.keys import DeploymentKeys
from dyn.control.sockets import Security
from dyn.planner.decisions import DecisionLog
from dyn.planner.health import Deadlines
from dyn.planner.scaling import Scaler
from dyn.planner.state import StateStore

ROOT = Path(__file__).resolve().parents[2]


def recording_scaler(fleet, tmp_path: Path, recipe: Recipe, keys: DeploymentKeys | None = None,
                     **deadlines) -> tuple[Scaler, list[tuple[str, str, dict]], StateStore]:
    """(scaler on the hgx-h100x8 topology, the (process, action, args) it sent, its state store)."""
    sent: list[tuple[str, str, dict]] = []

    async def send(process_id: str, command) -> None:
        sent.append((process_id, command.action, dict(command.args)))

    async def push() -> None:
        sent.append(("frontend", "update_workers", {}))

    store = StateStore(recipe.name, root=tmp_path)
    store.dir.mkdir(parents=True, exist_ok=True)
    scaler = Scaler(fleet, load_topology(ROOT / "topologies/hgx-h100x8.yaml"), recipe, keys, store,
                    Security.from_keys(None), Deadlines(**deadlines), DecisionLog(), send=send, push_workers=push,
                    budget={"max_restarts": 3, "window_s": 600.0})
    return scaler, sent, store
