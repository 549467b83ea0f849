"""The hand-off's transports follow where the engine's KV pool lives, not the GPUs a placement names.

A mock worker placed on two GPUs of one node holds its KV in host memory. It
used to pick cuda_ipc (the path for GPUs sharing a node's NVLink) because the
placement named GPUs, and the sending worker refused every such pull ("cuda_ipc
needs uint8 CUDA block views"): each request was prefilled twice, once on the
prefill worker and again on the decode worker, so the SLO planner measured
twice the prompt tokens and kept a prefill worker it did not need (the flaky
scale-down of tests/e2e/test_planner_live.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq.asyncio

from dyn.config.loader import parse_recipe, parse_topology
from dyn.config.process import ProcessConfig
from dyn.control.requests import GenerateRequest
from dyn.control.sampling import SamplingParams
from dyn.control.sockets import Security
from dyn.engine.backend import EngineRequest, TokenOutput
from dyn.worker.engine_loop import EngineLoop
from dyn.worker.process_startup import create_engine_for, start_handoff
from dyn.worker.request_server import Stream

RECIPE = """name: r
model: {engine: mock, block_size: 4, mock: {prefill_base_s: 0, prefill_s_per_token: 0, decode_base_s: 0,
        decode_s_per_seq: 0}}
mode: disaggregated
workers: {prefill: {replicas: 1}, decode: {replicas: 1}}
"""
TOPOLOGY = """name: t
head: tray1
racks:
  - name: r0
    nodes:
      - {name: tray1, address: local, bind_address: 127.0.0.1, gpus: 2, gpu_model: TEST-GPU, gpu_memory_gib: 80}
"""


class Outputs:
    """An EngineLoop sink: every request's tokens, and an event per finished request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, threading.Event] = {}

    def __call__(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                self.done(out.request_id).set()

    def done(self, request_id: str) -> threading.Event:
        return self.finished.setdefault(request_id, threading.Event())


def _hand_off_one_request(topology_text: str, places: dict[str, tuple[str, tuple[int, ...]]],
                          between=None) -> tuple[object, object, object]:
    """A prefill and a decode worker placed at `places` ({role: (node, gpus)}) hand one request's
    KV over. `between()` runs after both have started and before the hand-off.
    Returns (the prefill engine, the prefill hand-off's sender config, the decode hand-off's stats)."""
    recipe = parse_recipe(RECIPE, "r.yaml")
    topology = parse_topology(topology_text, "t.yaml")

    async def scenario():
        ctx = zmq.asyncio.Context()
        sides = {}
        try:
            for role, (node, gpus) in places.items():
                cfg = ProcessConfig("d", f"{role}-0", role, node, "", RECIPE, topology_text, gpus=gpus)
                group = next(g for g in recipe.workers if g.role == role)
                engine = create_engine_for(recipe, group, cfg)
                outputs = Outputs()
                loop = EngineLoop(engine, outputs, name=role)
                loop.start()
                sides[role] = (engine, loop, outputs, await start_handoff(ctx, Security(), recipe, topology, cfg,
                                                                           engine, loop))
            if between is not None:
                between()
            engine, p_loop, p_out, p_handoff = sides["prefill"]

            prompt, sampling = list(range(5, 45)), SamplingParams(max_tokens=6, ignore_eos=True)
            p_loop.submit(lambda e: e.add_request(EngineRequest("r1", prompt, sampling, prefill_only=True)))
            assert await asyncio.to_thread(p_out.done("r1").wait, 10)
            stream = Stream("r1", b"frontend", len(prompt), prefill_only=True)
            await p_handoff.export(stream, None)

            _, d_loop, d_out, d_handoff = sides["decode"]
            first = p_out.tokens["r1"][0]
            await d_handoff.import_and_decode(Stream("r1", b"frontend", len(prompt)), GenerateRequest(
                "r1", prompt, sampling, kv_source=stream.kv_offer, first_token=first))
            assert await asyncio.to_thread(d_out.done("r1").wait, 10)
            assert len(d_out.tokens["r1"]) == sampling.max_tokens - 1  # the first token came from the prefill
            return engine, p_handoff.sender.config, d_handoff.stats
        finally:
            for _, loop, _, handoff in sides.values():
                await handoff.close()
                loop.stop()
            ctx.destroy(linger=0)

    return asyncio.run(scenario())


def test_a_mock_worker_on_gpus_pulls_its_same_node_peers_kv_from_host_memory():
    engine, sender_config, stats = _hand_off_one_request(TOPOLOGY, {"prefill": ("tray1", (0,)),
                                                                    "decode": ("tray1", (1,))})
    assert (stats.pulls, stats.pull_failures, stats.local_fallbacks) == (1, 0, 0)
    assert set(stats.bytes_by_transport) == {"shm"} and stats.bytes_pulled == 10 * engine.block_bytes
    assert not engine.kv_on_cuda and "cuda_ipc" not in sender_config.transports


TWO_TRAYS = TOPOLOGY + "      - {name: tray2, address: local, bind_address: 127.0.0.2}\n"


def test_workers_on_two_nodes_start_their_nixl_agents_before_the_first_hand_off(monkeypatch):
    """Importing NIXL and starting an agent took ~4 s of the first request between two nodes (and
    stalled it past the frontend's deadline on a loaded host): both ends now start them up front."""
    pytest.importorskip("nixl")
    from dyn.shuttle.transports import nixl

    made: list[str] = []
    new_agent = nixl._new_agent
    monkeypatch.setattr(nixl, "_new_agent", lambda prefix: made.append(prefix) or new_agent(prefix))
    at_start: list[str] = []

    engine, sender_config, stats = _hand_off_one_request(
        TWO_TRAYS, {"prefill": ("tray1", ()), "decode": ("tray2", ())}, between=lambda: at_start.extend(made))

    assert set(stats.bytes_by_transport) == {"nixl"} and stats.bytes_pulled == 10 * engine.block_bytes
    assert sorted(at_start) == ["dyn-rx", "dyn-rx", "dyn-tx", "dyn-tx"]  # both workers, both ends
    assert made == at_start  # none made during the hand-off


def test_workers_of_one_node_start_no_nixl_agent(monkeypatch):
    """On one node every path is shm (or CUDA IPC): NIXL is never imported nor advertised."""
    from dyn.shuttle.transports import nixl

    made: list[str] = []
    monkeypatch.setattr(nixl, "_new_agent", lambda prefix: made.append(prefix))
    _, sender_config, stats = _hand_off_one_request(TOPOLOGY, {"prefill": ("tray1", ()), "decode": ("tray1", ())})
    assert set(stats.bytes_by_transport) == {"shm"}
    assert made == [] and "nixl" not in sender_config.transports

