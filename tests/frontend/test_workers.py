"""WorkerPool: the daemon's worker list, and the request-plane decode fast path."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import zmq.asyncio

from dyn import PROTOCOL_VERSION
from dyn.control.requests import REQUEST_CODEC, Finish, TokenChunk, TokenChunks
from dyn.control.sampling import PromptLogprobs
from dyn.control.sockets import BadMessages, Security
from dyn.frontend.workers import WorkerLimits, WorkerPool, _decode
from dyn.worker.request_server import encode_token_chunks, token_chunk_fields


def _entry(wid: str, role: str = "decode", port: int = 5555, **extra) -> dict:
    return {"id": wid, "role": role, "node": "n1", "gpus": [0], "state": "ready",
            "addresses": {"request": f"tcp://127.0.0.1:{port}"}, "metrics": {"num_waiting": 3}, **extra}


def test_update_adds_refreshes_and_removes_workers():
    async def go():
        ctx = zmq.asyncio.Context()
        pool = WorkerPool(ctx, Security(), {"decode": WorkerLimits(max_batch_size=2, max_queue=4)})
        pool.update([_entry("d0"), _entry("d1", port=5556), "garbage", {"id": 5}])
        assert sorted(pool.workers) == ["d0", "d1"] and pool.num_bad_updates == 2
        d0 = pool.workers["d0"]
        assert d0.gpus == (0,) and d0.node == "n1" and d0.queue_depth == 3 and not d0.is_overloaded
        pool.update([_entry("d0", state="draining", metrics={"num_waiting": 9, "bad": "x"})])
        assert list(pool.workers) == ["d0"] and pool.workers["d0"] is d0
        assert d0.state == "draining" and not d0.is_ready and d0.is_overloaded
        pool.update([_entry("d0", port=6000)])  # moved: a new connection
        assert pool.workers["d0"] is not d0 and pool.workers["d0"].address.endswith(":6000")
        pool.close()
        await asyncio.sleep(0)
        ctx.term()
    asyncio.run(go())


def test_in_flight_counts_drive_queue_depth():
    async def go():
        ctx = zmq.asyncio.Context()
        pool = WorkerPool(ctx, Security(), {"both": WorkerLimits(max_batch_size=1, max_queue=2)})
        handle = pool.add("w", "both", "tcp://127.0.0.1:5999")
        handle.in_flight = 3
        assert handle.queue_depth == 2 and handle.is_overloaded
        pool.close()
        await asyncio.sleep(0)
        ctx.term()
    asyncio.run(go())


def test_fast_decode_matches_the_codec():
    bad = BadMessages("t")
    finish = Finish("r1", "stop", 3, 4, kv_offer={"a": 1})
    batches = [TokenChunks([TokenChunk("r1", [1, 2, 3], [-0.5, -1.0, 0.0], 16)]),
               TokenChunks([TokenChunk("r1", [9], None, 0, Finish("r1", "length", 3, 4)), TokenChunk("r2", [7])]),
               TokenChunks([TokenChunk("r1", [9], None, 0, finish)]),  # an offer takes the codec's path
               TokenChunks([TokenChunk("r4", [2], prompt_logprobs=PromptLogprobs([-0.5], [[3]], [[-0.25]]))])]
    for message in (*batches, finish, TokenChunk("r3", [5])):
        assert _decode(memoryview(REQUEST_CODEC.encode(message)), bad) == message
    for batch in batches:  # as a worker sends them: default-valued fields left out
        sparse = encode_token_chunks([token_chunk_fields(
            c.request_id, c.token_ids, c.logprobs, c.num_cached_tokens,
            None if c.finish is None else (c.finish.reason, c.finish.num_prompt_tokens, c.finish.num_completion_tokens),
            prompt_logprobs=c.prompt_logprobs) for c in batch.chunks])
        if all(c.finish is None or c.finish.kv_offer is None for c in batch.chunks):
            assert _decode(memoryview(sparse), bad) == batch
    assert bad.total == 0


def test_fast_decode_rejects_what_the_codec_rejects():
    bad = BadMessages("t")
    good = {"request_id": "r", "token_ids": [1]}
    chunks = [
        {"request_id": "r", "token_ids": [True]},
        {"request_id": "r", "token_ids": [1], "extra": 1},
        {"request_id": 7, "token_ids": [1]},
        {"request_id": "r", "token_ids": [1], "logprobs": ["x"]},
        {"request_id": "r", "token_ids": [1], "finish": {"request_id": "r"}},
        {"request_id": "r", "token_ids": [1], "finish": {"request_id": "r", "reason": "stop", "num_prompt_tokens": True}},
        {"request_id": "r", "token_ids": [1], "finish": {"request_id": "r", "reason": "stop", "evil": 1}},
        {"request_id": "r", "token_ids": [1], "finish": "stop"},
        {"request_id": "r", "token_ids": [1], "prompt_logprobs": {"logprobs": ["x"]}},
        # the shape of most chunks (dyn.worker.request_server.token_chunk_fields), with a bad value
        {"request_id": "r", "token_ids": [True], "num_cached_tokens": 0},
        {"request_id": "r", "token_ids": [1.0], "num_cached_tokens": 0},
        {"request_id": "r", "token_ids": [1], "num_cached_tokens": True},
        {"request_id": b"r", "token_ids": [1], "num_cached_tokens": 0},
    ]
    frames = [[PROTOCOL_VERSION, "token_chunks", {"chunks": [good, chunk]}] for chunk in chunks] + [
        [PROTOCOL_VERSION - 1, "token_chunks", {"chunks": [good]}],  # a peer of another version
        [PROTOCOL_VERSION, "token_chunks", {"chunks": [good], "extra": 1}],
        [PROTOCOL_VERSION, "token_chunks", {"chunks": good}],
    ]
    for frame in frames:
        assert _decode(memoryview(msgpack.packb(frame)), bad) is None
    assert _decode(memoryview(b"\xc1garbage"), bad) is None
    assert bad.total == len(frames) + 1
    assert bad.counts[f"protocol version {PROTOCOL_VERSION - 1}, expected {PROTOCOL_VERSION}"] == 1  # says both


@contextlib.asynccontextmanager
async def _asked_for_a_snapshot(on_snapshot):
    """A WorkerPool whose worker "w" (a bare ROUTER here) it has asked for a KV snapshot: yields
    the pool, the request frame, and `answer(message)`, which replies on that connection."""
    from dyn.control.sockets import server_socket

    ctx = zmq.asyncio.Context()
    server = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", Security())
    pool = WorkerPool(ctx, Security())
    pool.add("w", "decode", server.getsockopt_string(zmq.LAST_ENDPOINT))
    pool.on_snapshot = on_snapshot
    try:
        await pool.request_snapshot("w")
        client, data = await asyncio.wait_for(server.recv_multipart(), 5)

        async def answer(message) -> None:
            await server.send_multipart([client, REQUEST_CODEC.encode(message)])

        yield pool, data, answer
    finally:
        pool.close()
        server.close(linger=0)
        await asyncio.sleep(0)
        ctx.term()


async def _until_any(got: list) -> None:
    for _ in range(100):
        if got:
            return
        await asyncio.sleep(0.01)


def test_kv_snapshots_ride_the_request_plane():
    from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest

    async def go():
        got: list[KvSnapshot] = []
        async with _asked_for_a_snapshot(got.append) as (pool, request, answer):
            assert REQUEST_CODEC.decode(request) == KvSnapshotRequest("w")
            for snap in (KvSnapshot("someone-else", 1, 1), KvSnapshot("w", 7, 3, {"device": [11, 12]})):
                await answer(snap)
            await _until_any(got)
            assert got == [KvSnapshot("w", 7, 3, {"device": [11, 12]})]
            assert pool.bad.total == 1  # a worker may only speak for itself
    asyncio.run(go())


def test_a_frame_whose_handling_raises_is_counted_and_the_worker_is_still_heard():
    """A bug met by one frame (here the snapshot hook) used to end this worker's reader: every
    stream on it then stalled until its deadline. Now the frame is counted, the first such
    failure logged with its traceback, and the next frames are handled."""
    from dyn.control.kv_events import KvSnapshot

    async def go():
        got: list[KvSnapshot] = []

        def on_snapshot(snap: KvSnapshot) -> None:
            if snap.epoch == 1:
                raise ValueError("a bug")
            got.append(snap)

        async with _asked_for_a_snapshot(on_snapshot) as (pool, _, answer):
            for epoch in (1, 2):
                await answer(KvSnapshot("w", epoch, 1))
                await asyncio.sleep(0.05)  # (two wake-ups: the second frame is not drained with the first)
            await _until_any(got)
            assert got == [KvSnapshot("w", 2, 1)]
            assert pool.bad.counts == {"KvSnapshot from w: ValueError": 1}
    asyncio.run(go())


def test_opening_a_stream_on_a_worker_that_just_left_fails_it_as_gone():
    """Routing picked a worker that a relaunch removed before the send: the stream fails with
    worker_gone (the dispatcher re-routes it), not a KeyError that became a 500."""
    from dyn.control.requests import GenerateRequest
    from dyn.control.sampling import SamplingParams
    from dyn.frontend.workers import WORKER_GONE

    async def go():
        ctx = zmq.asyncio.Context()
        pool = WorkerPool(ctx, Security())
        pool.update([_entry("d0")])
        pool.update([])  # d0 left
        queue = await pool.open("d0", GenerateRequest("r1", [1, 2, 3], SamplingParams(max_tokens=2)))
        failed = queue.get_nowait()
        assert failed.code == WORKER_GONE and failed.retryable and "d0" in failed.message
        assert pool.num_open_streams == 0
        pool.close()
        await asyncio.sleep(0)
        ctx.term()
    asyncio.run(go())


def test_a_cancel_reaches_the_worker_before_the_same_request_sent_again():
    """A migration may re-send a request to the worker it just cancelled it on (the only decode
    worker left): the worker must see the cancel first, so the old attempt stops before the new
    one starts."""
    from dyn.control.requests import Cancel, GenerateRequest
    from dyn.control.sampling import SamplingParams

    async def go():
        ctx = zmq.asyncio.Context()
        worker = ctx.socket(zmq.ROUTER)
        port = worker.bind_to_random_port("tcp://127.0.0.1")
        pool = WorkerPool(ctx, Security())
        pool.add("d0", "decode", f"tcp://127.0.0.1:{port}")
        request = GenerateRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4))
        await pool.open("d0", request)
        pool.close_stream("r1", cancel=True)
        await pool.open("d0", request)
        seen = []
        for _ in range(3):
            _, frame = await asyncio.wait_for(worker.recv_multipart(), 5)
            seen.append(type(REQUEST_CODEC.decode(frame)))
        assert seen == [GenerateRequest, Cancel, GenerateRequest]
        pool.close()
        worker.close(linger=0)
        await asyncio.sleep(0)
        ctx.term()
    asyncio.run(go())
