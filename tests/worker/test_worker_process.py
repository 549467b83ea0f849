"""The worker process end to end: a real `dyn worker` subprocess with the mock engine."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from dyn.config.process import ProcessConfig
from dyn.control.keys import DeploymentKeys, write_private
from dyn.control.messages import CONTROL_CODEC, Command, Heartbeat, Register, RegisterAck
from dyn.control.sampling import SamplingParams
from dyn.control.requests import (REQUEST_CODEC, Cancel, Finish, GenerateRequest, RequestFailed, TokenChunk,
                                  TokenChunks, unbatched)
from dyn.control.sockets import Security, client_socket, server_socket

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
name: worker-test
model:
  engine: mock
  name: mock
  block_size: 16
  max_context: 4096
  mock: {prefill_base_s: 0.0, prefill_s_per_token: 0.0, decode_base_s: 0.002, decode_s_per_seq: 0.0,
         num_kv_blocks: 512}
mode: aggregated
workers:
  both: {replicas: 1}
auth: {curve: true}
"""


def _start_worker(tmp_path: Path, daemon_address: str = "", keys: DeploymentKeys | None = None, *,
                  process_id: str = "worker-0", role: str = "both", recipe: str = RECIPE,
                  drain_grace_s: float = 10.0):
    keys_path = None
    if keys is not None:
        keys_path = tmp_path / f"{process_id}.keys"
        write_private(keys_path, keys.for_process(process_id).to_json())
    topology = (ROOT / "topologies" / "local.yaml").read_text()
    cfg = ProcessConfig(deployment="t", process_id=process_id, role=role, node="local",
                        daemon_address=daemon_address, recipe_text=recipe, topology_text=topology,
                        keys_path=str(keys_path) if keys_path else None, heartbeat_interval_s=0.2,
                        daemon_grace_s=3.0, drain_grace_s=drain_grace_s)
    cfg_path = tmp_path / f"{process_id}.json"
    cfg_path.write_text(cfg.to_json())
    log = open(tmp_path / f"{process_id}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dyn", "worker", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def _register(daemon: zmq.asyncio.Socket) -> tuple[bytes, Register]:
    while True:
        ident, data = await asyncio.wait_for(daemon.recv_multipart(), 20)
        msg = CONTROL_CODEC.decode(data)
        if isinstance(msg, Register):
            await daemon.send_multipart([ident, CONTROL_CODEC.encode(RegisterAck(ok=True, heartbeat_interval_s=0.2))])
            return ident, msg


async def _until_ready(daemon: zmq.asyncio.Socket) -> Heartbeat:
    while True:
        ident, data = await asyncio.wait_for(daemon.recv_multipart(), 20)
        msg = CONTROL_CODEC.decode(data)
        await daemon.send_multipart([ident, CONTROL_CODEC.encode(RegisterAck(ok=True, heartbeat_interval_s=0.2))])
        if isinstance(msg, Heartbeat) and msg.state == "ready":
            return msg


async def _ack_forever(daemon: zmq.asyncio.Socket) -> None:
    """Play the daemon: acknowledge every heartbeat so the worker stays up."""
    while True:
        ident, _ = await daemon.recv_multipart()
        await daemon.send_multipart([ident, CONTROL_CODEC.encode(RegisterAck(ok=True, heartbeat_interval_s=0.2))])


async def _collect(sock, request_id: str) -> tuple[list[int], object]:
    tokens: list[int] = []
    while True:
        for msg in unbatched(REQUEST_CODEC.decode(await asyncio.wait_for(sock.recv(), 20))):
            assert msg.request_id == request_id
            if isinstance(msg, TokenChunk):
                tokens.extend(msg.token_ids)
                if msg.finish is not None:  # the stream's end, carried by its last chunk
                    return tokens, msg.finish
            else:
                return tokens, msg


async def _chunk_sizes(sock, request_id: str) -> tuple[list[int], object]:
    """The sizes of a request's token chunks as they arrived, and how it ended."""
    sizes: list[int] = []
    while True:
        for msg in unbatched(REQUEST_CODEC.decode(await asyncio.wait_for(sock.recv(), 20))):
            assert msg.request_id == request_id and isinstance(msg, TokenChunk)
            sizes.append(len(msg.token_ids))
            if msg.finish is not None:
                return sizes, msg.finish


def test_worker_registers_serves_cancels_and_stops(tmp_path):
    keys = DeploymentKeys.generate(["daemon", "worker-0", "frontend"])

    async def scenario():
        ctx = zmq.asyncio.Context()
        sec = Security.from_keys(keys.for_process("daemon"))
        daemon = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", sec)
        proc = _start_worker(tmp_path, daemon.getsockopt_string(zmq.LAST_ENDPOINT), keys)
        try:
            _, reg = await _register(daemon)
            assert reg.process_id == "worker-0" and reg.role == "both" and reg.pid == proc.pid
            assert reg.addresses["request"].startswith("tcp://127.0.0.1:")
            hb = await _until_ready(daemon)
            assert hb.metrics["kv_blocks_total"] == 512
            acker = asyncio.create_task(_ack_forever(daemon))

            frontend = client_socket(ctx, zmq.DEALER, reg.addresses["request"],
                                     Security.from_keys(keys.for_process("frontend")))
            prompt = list(range(1, 40))
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest("r1", prompt, SamplingParams(max_tokens=5))))
            tokens, end = await _collect(frontend, "r1")
            assert len(tokens) == 5 and isinstance(end, Finish)
            assert (end.reason, end.num_prompt_tokens, end.num_completion_tokens) == ("length", 39, 5)

            # a non-streaming client's request (hold_s): the first output at once, the rest together
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest("held", prompt, SamplingParams(max_tokens=40),
                                                                     hold_s=30.0)))
            sizes, end = await _chunk_sizes(frontend, "held")
            assert len(sizes) == 2 and sum(sizes) == 40 and isinstance(end, Finish) and end.num_completion_tokens == 40
            # ... and never longer than hold_s (40 steps of 2 ms, held 10 ms at a time)
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest("short", prompt, SamplingParams(max_tokens=40),
                                                                     hold_s=0.01)))
            sizes, end = await _chunk_sizes(frontend, "short")
            assert sum(sizes) == 40 and 3 <= len(sizes) < 40 and end.num_completion_tokens == 40

            # a bad request is refused with a reason; the worker keeps serving
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest("bad", prompt, SamplingParams(max_tokens=0))))
            _, end = await _collect(frontend, "bad")
            assert isinstance(end, RequestFailed) and end.code == "bad_request" and "max_tokens" in end.message

            # cancel mid-stream ends the stream with reason abort
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest("long", prompt, SamplingParams(max_tokens=2000))))
            first = REQUEST_CODEC.decode(await asyncio.wait_for(frontend.recv(), 20))
            assert isinstance(first, TokenChunks) and [c.request_id for c in first.chunks] == ["long"]
            await frontend.send(REQUEST_CODEC.encode(Cancel("long")))
            tokens, end = await _collect(frontend, "long")
            assert isinstance(end, Finish) and end.reason == "abort" and end.num_completion_tokens < 2000

            # a stop command makes it exit cleanly
            ident = b"worker-0"
            await daemon.send_multipart([ident, CONTROL_CODEC.encode(Command(action="stop"))])
            assert await asyncio.to_thread(proc.wait, 20) == 0
            acker.cancel()
        finally:
            _stop(proc)
            sec.stop()
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_worker_exits_when_daemon_is_gone(tmp_path):
    async def scenario():
        ctx = zmq.asyncio.Context()
        daemon = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", Security())
        proc = _start_worker(tmp_path, daemon.getsockopt_string(zmq.LAST_ENDPOINT))
        try:
            await _register(daemon)
            daemon.close()  # the daemon vanishes; grace is 3 s
            started = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 30)
            assert code == 0 and time.monotonic() - started < 25
        finally:
            _stop(proc)
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_sigterm_fails_in_flight_requests_explicitly(tmp_path):
    async def scenario():
        ctx = zmq.asyncio.Context()
        daemon = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", Security())
        slow = RECIPE.replace("decode_base_s: 0.002", "decode_base_s: 0.02")  # 4k tokens outlast the grace
        proc = _start_worker(tmp_path, daemon.getsockopt_string(zmq.LAST_ENDPOINT), recipe=slow, drain_grace_s=1.0)
        try:
            _, reg = await _register(daemon)
            await _until_ready(daemon)
            acker = asyncio.create_task(_ack_forever(daemon))
            frontend = client_socket(ctx, zmq.DEALER, reg.addresses["request"], Security())
            await frontend.send(REQUEST_CODEC.encode(GenerateRequest(
                "r", [1, 2, 3], SamplingParams(max_tokens=100000, ignore_eos=True))))
            assert isinstance(REQUEST_CODEC.decode(await asyncio.wait_for(frontend.recv(), 20)), TokenChunks)
            stopped = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            _, end = await _collect(frontend, "r")
            assert isinstance(end, RequestFailed) and end.retryable
            assert 1.0 <= time.monotonic() - stopped < 8  # after drain_grace_s, not the default 10 s
            assert await asyncio.to_thread(proc.wait, 30) == 0
            acker.cancel()
        finally:
            _stop(proc)
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_token_chunks_fast_encoding_decodes_as_the_codecs_and_leaves_defaults_out():
    from dyn.control.sampling import PromptLogprobs
    from dyn.worker.request_server import encode_token_chunks, token_chunk_fields

    chunks = [TokenChunk("r-1", [5, 6], None, 0), TokenChunk("ü", [1], [-0.5], 12),
              TokenChunk("r-2", [3], None, 4, Finish("r-2", "length", 20, 7)),
              TokenChunk("r-3", [4], None, 0, prompt_logprobs=PromptLogprobs([-1.5, -0.25], [[7], [9]], [[-1.0], [-0.25]]))]
    data = encode_token_chunks([token_chunk_fields(
        c.request_id, c.token_ids, c.logprobs, c.num_cached_tokens,
        None if c.finish is None else (c.finish.reason, c.finish.num_prompt_tokens, c.finish.num_completion_tokens),
        prompt_logprobs=c.prompt_logprobs)
        for c in chunks])
    assert REQUEST_CODEC.decode(data) == TokenChunks(chunks)
    wire = msgpack.unpackb(data)[2]["chunks"]
    assert wire[0] == {"request_id": "r-1", "token_ids": [5, 6], "num_cached_tokens": 0}  # no default-valued field
    assert set(wire[2]["finish"]) == {"request_id", "reason", "num_prompt_tokens", "num_completion_tokens"}
    assert len(data) < len(REQUEST_CODEC.encode(TokenChunks(chunks)))


def test_outputs_of_several_steps_join_per_request_in_order():
    from dyn.engine.backend import TokenOutput
    from dyn.worker.request_server import _merge_outputs

    steps = [TokenOutput("a", [1], num_cached_tokens=16), TokenOutput("b", [7]),
             TokenOutput("a", [2]), TokenOutput("b", [8], True, "length"),
             TokenOutput("a", [3], True, "stop"), TokenOutput("b", [9])]  # a new "b" after the old one ended
    merged = _merge_outputs(steps)
    assert [(o.request_id, o.token_ids, o.finished, o.finish_reason) for o in merged] == [
        ("a", [1, 2, 3], True, "stop"), ("b", [7, 8], True, "length"), ("b", [9], False, None)]
    assert merged[0].num_cached_tokens == 16 and steps[0].token_ids == [1]  # inputs untouched
    with_lp = _merge_outputs([TokenOutput("c", [1], logprobs=[-0.1]), TokenOutput("c", [2], logprobs=[-0.2])])
    assert with_lp[0].token_ids == [1, 2] and with_lp[0].logprobs == [-0.1, -0.2]
    one_step = [TokenOutput("a", [4]), TokenOutput("b", [5], True, "stop")]
    assert _merge_outputs(one_step) == [TokenOutput("a", [4]), TokenOutput("b", [5], True, "stop")]
