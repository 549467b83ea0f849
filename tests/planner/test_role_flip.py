"""Role flips per engine: vLLM workers flip in place (kv_both connector); an engine that could not is relaunched.

The Scaler runs for real against a recording fake of the fleet's I/O, as in
test_scaling.py; the in-place decision is derived from the engine arguments
the workers are built from (dyn.engine.vllm_args), not from a flag.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import dyn.engine.vllm_args as vllm_args
from dyn.config.loader import load_recipe, parse_recipe
from dyn.planner.health import ProcessSlot
from dyn.planner.policy import ScalingAction
from dyn.planner.scaling import flips_in_place
from scaler_fakes import recording_scaler

ROOT = Path(__file__).resolve().parents[2]
VLLM_RECIPES = ["smollm2-vllm-local", "llama-3.1-8b-hgx", "llama-3.1-70b-nvl72", "deepseek-r1-nvl72"]


@pytest.mark.parametrize("name", VLLM_RECIPES)
def test_every_worker_of_a_shipped_vllm_recipe_serves_either_role(name: str) -> None:
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.model.engine == "vllm" and recipe.mode == "disaggregated"
    for group in recipe.workers:
        for device in ("cpu", "cuda"):
            kwargs = vllm_args.engine_kwargs(recipe.model, group, device=device, disaggregated=True)
            assert vllm_args.serves_either_role(kwargs), (group.role, device)
    assert flips_in_place(recipe)


def test_engines_without_a_two_way_connector_do_not_flip_in_place() -> None:
    aggregated = parse_recipe("name: a\nmodel: {path: /m, engine: vllm}\nworkers:\n  both: {}\n", "a.yaml")
    assert not vllm_args.serves_either_role(
        vllm_args.engine_kwargs(aggregated.model, aggregated.workers[0], device="cuda"))
    assert not flips_in_place(aggregated)
    one_sided = {"kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}}
    assert not vllm_args.serves_either_role(one_sided)
    torch = parse_recipe("name: t\nmodel: {path: /m, engine: torch}\nmode: disaggregated\n"
                         "workers:\n  prefill: {}\n  decode: {}\n", "t.yaml")
    assert flips_in_place(torch)  # both shuttle ends run in every torch worker


def test_a_vllm_worker_flips_with_one_command_and_keeps_running(tmp_path: Path) -> None:
    fleet, scaler, sent = _setup(tmp_path)
    flipped = asyncio.run(scaler.set_role(ScalingAction("set_role", "decode-1", "prefill", "prefill queue")))
    assert flipped and fleet.slots["decode-1"].role == "prefill"
    assert sent == [("decode-1", "set_role", {"role": "prefill"}), ("frontend", "update_workers", {})]
    assert fleet.launched == [] and fleet.killed == []


def test_a_worker_that_cannot_flip_in_place_is_drained_stopped_and_relaunched(monkeypatch, tmp_path: Path) -> None:
    built = vllm_args.engine_kwargs

    def decode_only_consumes(spec, group, **kw):  # as if decode workers were one-sided kv_consumer
        kwargs = built(spec, group, **kw)
        if group.role == "decode":
            kwargs["kv_transfer_config"] = {**kwargs["kv_transfer_config"], "kv_role": "kv_consumer"}
        return kwargs

    monkeypatch.setattr(vllm_args, "engine_kwargs", decode_only_consumes)
    fleet, scaler, sent = _setup(tmp_path)
    worker = fleet.slots["decode-1"]

    async def scenario() -> bool:
        async def worker_side() -> None:  # drains at once, exits on stop
            while ("decode-1", "drain", {}) not in sent:
                await asyncio.sleep(0.01)
            worker.metrics = {"in_flight": 0.0, "num_running": 0.0}
            await asyncio.sleep(0.06)
            worker.heard(time.monotonic())
            while ("decode-1", "stop", {}) not in sent:
                await asyncio.sleep(0.01)
            fleet.running.discard(worker.pid)

        side = asyncio.create_task(worker_side())
        done = await scaler.set_role(ScalingAction("set_role", "decode-1", "prefill", "prefill queue"))
        await side
        return done

    assert asyncio.run(scenario())
    assert "decode-1" not in fleet.slots
    assert [a for _, a, _ in sent if a != "update_workers"] == ["drain", "stop"]
    (new_id,) = fleet.launched
    assert fleet.slots[new_id].role == "prefill" and new_id.startswith("prefill-")
    assert any("relaunching as prefill" in e and "cannot change role in place" in e for e in fleet.events)


class _Fleet:
    def __init__(self, slots: list[ProcessSlot]) -> None:
        self.slots = {s.id: s for s in slots}
        self.events: list[str] = []
        self.launched: list[str] = []
        self.killed: list[str] = []
        self.running = {s.pid for s in slots if s.pid}
        self.nodes = self

    async def alive(self, node: str, pids: list[int]) -> set[int]:
        return {p for p in pids if p in self.running}

    def note(self, text: str) -> None:
        self.events.append(text)

    def add(self, slot: ProcessSlot, **budget) -> None:
        self.slots[slot.id] = slot

    async def launch(self, slot: ProcessSlot) -> None:
        self.launched.append(slot.id)
        slot.set_state("starting", time.monotonic())

    async def kill(self, slot: ProcessSlot, sig: int) -> None:
        self.killed.append(slot.id)
        self.running.discard(slot.pid)

    async def remove_secrets(self, slots) -> None:
        pass


def _setup(tmp_path: Path):
    recipe = load_recipe(ROOT / "recipes/llama-3.1-8b-hgx.yaml")
    slots = [ProcessSlot("prefill-0", "prefill", "hgx01", (0,), state="ready", pid=700, registered=True),
             ProcessSlot("decode-0", "decode", "hgx01", (1,), state="ready", pid=701, registered=True),
             ProcessSlot("decode-1", "decode", "hgx01", (2,), state="ready", pid=702, registered=True)]
    fleet = _Fleet(slots)
    scaler, sent, _ = recording_scaler(fleet, tmp_path, recipe, heartbeat_interval_s=0.05, stop_s=3.0)
    return fleet, scaler, sent
