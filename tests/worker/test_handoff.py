"""Disaggregated hand-off between two real worker processes over the shuttle."""

import asyncio
import sys
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from dyn.control.sampling import SamplingParams
from dyn.control.requests import REQUEST_CODEC, Finish, GenerateRequest, TokenChunk, unbatched
from dyn.control.sockets import Security, client_socket, server_socket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_worker_process import RECIPE, _ack_forever, _register, _start_worker, _stop, _until_ready  # noqa: E402

DISAGG = RECIPE.replace("mode: aggregated", "mode: disaggregated").replace(
    "  both: {replicas: 1}", "  prefill: {replicas: 1}\n  decode: {replicas: 1}")


async def _generate(sock, msg: GenerateRequest) -> tuple[list[int], Finish]:
    await sock.send(REQUEST_CODEC.encode(msg))
    tokens: list[int] = []
    while True:
        for reply in unbatched(REQUEST_CODEC.decode(await asyncio.wait_for(sock.recv(), 20))):
            if isinstance(reply, TokenChunk):
                tokens += reply.token_ids
                if reply.finish is not None:  # the stream's end, carried by its last chunk
                    return tokens, reply.finish
            else:
                assert isinstance(reply, Finish), reply
                return tokens, reply


@pytest.mark.parametrize("break_offer", [None, "unreachable", "unreadable"])
def test_prefill_then_decode_matches_one_worker(tmp_path, break_offer):
    async def scenario():
        ctx = zmq.asyncio.Context()
        daemon = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", Security())
        address = daemon.getsockopt_string(zmq.LAST_ENDPOINT)
        procs = [_start_worker(tmp_path, address, process_id=pid, role=role, recipe=DISAGG)
                 for pid, role in (("prefill-0", "prefill"), ("decode-0", "decode"))]
        try:
            regs: dict = {}
            while len(regs) < len(procs):  # a process re-sends Register until acknowledged
                _, reg = await _register(daemon)
                regs[reg.process_id] = reg
            ready: set[str] = set()
            while len(ready) < len(procs):
                ready.add((await _until_ready(daemon)).process_id)
            acker = asyncio.create_task(_ack_forever(daemon))
            prefill = client_socket(ctx, zmq.DEALER, regs["prefill-0"].addresses["request"], Security())
            decode = client_socket(ctx, zmq.DEALER, regs["decode-0"].addresses["request"], Security())

            prompts = [[(i * 37 + j) % 900 + 5 for j in range(n)] for i, n in enumerate((17, 64, 150))]
            for i, prompt in enumerate(prompts):
                # the reference runs on the prefill worker, so the decode worker holds none of the KV
                reference, _ = await _generate(prefill, GenerateRequest(f"ref{i}", prompt, SamplingParams(max_tokens=8)))

                first, done = await _generate(prefill, GenerateRequest(f"p{i}", prompt, SamplingParams(max_tokens=8),
                                                                       prefill_only=True))
                assert len(first) == 1 and done.kv_offer is not None
                offer = dict(done.kv_offer)
                if break_offer == "unreachable":  # the sender is unreachable: decode must prefill locally
                    offer["address"] = "tcp://127.0.0.1:9"
                    offer["host_id"] = "elsewhere"
                elif break_offer == "unreadable":  # e.g. a newer sender's field: prefill locally, not a 400
                    offer["field_of_a_newer_dyn"] = 1
                rest, end = await _generate(decode, GenerateRequest(
                    f"d{i}", prompt, SamplingParams(max_tokens=8), kv_source=offer, first_token=first[0]))
                assert first + rest == reference, f"prompt {i}"
                assert end.reason == "length"
            acker.cancel()
        finally:
            for proc in procs:
                _stop(proc)
            ctx.destroy(linger=0)

    asyncio.run(scenario())
