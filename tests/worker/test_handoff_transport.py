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


def test_a_mock_worker_on_gpus_pulls_its_same_node_peers_kv_from_host_memory():
    recipe = parse_recipe(RECIPE, "r.yaml")
    topology = parse_topology(TOPOLOGY, "t.yaml")

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        sides = {}
        try:
            for role, gpu in (("prefill", 0), ("decode", 1)):
                cfg = ProcessConfig("d", f"{role}-0", role, "tray1", "", RECIPE, TOPOLOGY, gpus=(gpu,))
                group = next(g for g in recipe.workers if g.role == role)
                engine = create_engine_for(recipe, group, cfg)
                outputs = Outputs()
                loop = EngineLoop(engine, outputs, name=role)
                loop.start()
                sides[role] = (engine, loop, outputs, await start_handoff(ctx, Security(), recipe, topology, cfg,
                                                                           engine, loop))
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
            stats = d_handoff.stats
            assert (stats.pulls, stats.pull_failures, stats.local_fallbacks) == (1, 0, 0)
            assert set(stats.bytes_by_transport) == {"shm"} and stats.bytes_pulled == 10 * engine.block_bytes
            assert len(d_out.tokens["r1"]) == sampling.max_tokens - 1  # the first token came from the prefill
            assert not engine.kv_on_cuda and "cuda_ipc" not in p_handoff.sender.config.transports
        finally:
            for _, loop, _, handoff in sides.values():
                await handoff.close()
                loop.stop()
            ctx.destroy(linger=0)

    asyncio.run(scenario())

