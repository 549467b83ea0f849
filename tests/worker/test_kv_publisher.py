"""The worker's KV event publisher: batches a burst of engine events, sleeps when idle."""

import asyncio
import threading

import zmq
import zmq.asyncio

from dyn.control.kv_events import KV_EVENT_CODEC, OP_REMOVED, OP_STORED, KvEventBatch
from dyn.control.sockets import Security
from dyn.kv.events import KvEvent
from dyn.worker.kv_publisher import MAX_BATCH_RUNS, KvEventPublisher


def test_events_of_a_burst_go_out_in_one_batch_and_an_idle_publisher_sends_nothing():
    async def scenario():
        ctx = zmq.asyncio.Context()
        pub = KvEventPublisher(ctx, "127.0.0.1", Security(), "w0", flush_interval_s=0.02)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.address)
        runner = asyncio.create_task(pub.run())
        try:
            await asyncio.sleep(0.2)  # the subscription reaches the PUB socket
            assert pub.seq == -1  # nothing happened: nothing was published, not even empty batches

            def engine_thread():  # the engine calls the listener from its own thread
                pub.listener(KvEvent("stored", [11, 12], None))
                pub.listener(KvEvent("removed", [5], 4))

            threading.Thread(target=engine_thread).start()
            batch = KV_EVENT_CODEC.decode_as(await asyncio.wait_for(sub.recv(), 5), KvEventBatch)
            assert (batch.worker_id, batch.seq) == ("w0", 0)
            assert batch.runs == [[OP_STORED, 0, -1, 11, 12], [OP_REMOVED, 0, 4, 5]]
            assert not await sub.poll(100)
            assert pub.seq == 0 and pub.snapshot().blocks["device"] == [11, 12]

            # A full batch goes out without waiting out the interval.
            pub._flush_interval_s = 30.0
            for idx in range(MAX_BATCH_RUNS):
                pub.listener(KvEvent("stored", [1000 + idx], None))
            batch = KV_EVENT_CODEC.decode_as(await asyncio.wait_for(sub.recv(), 5), KvEventBatch)
            assert len(batch.runs) == MAX_BATCH_RUNS and batch.seq == 1
        finally:
            runner.cancel()
            sub.close(linger=0)
            pub.close()
            ctx.term()

    asyncio.run(scenario())
