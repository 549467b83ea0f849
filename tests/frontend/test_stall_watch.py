"""The stall deadline after a stream's first message (dyn.frontend.worker_stream._StallWatch):
one timer per stream, re-armed from the inbox's arrival stamps, instead of a timer per token."""

from __future__ import annotations

import asyncio

from dyn.frontend.inbox import Inbox
from dyn.frontend.worker_stream import _STALLED, _StallWatch

WAIT_S = 0.15


def test_a_stream_that_keeps_coming_never_stalls():
    async def scenario() -> list[object]:
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        taken = []
        for n in range(10):  # 10 messages 0.05 s apart: 0.5 s in all, over three waits
            asyncio.get_running_loop().call_later(0.05, queue.put_nowait, n)
            taken.append(await queue.get())
        watch.close()
        await asyncio.sleep(2 * WAIT_S)
        return taken + [queue.qsize()]

    assert asyncio.run(scenario()) == [*range(10), 0]


def test_a_consumer_behind_its_queue_is_not_a_stall_while_the_worker_sends():
    """Messages wait in the queue while the consumer is busy (a saturated event loop) for longer
    than the wait: they keep arriving, so the worker is fine and nothing is declared stalled."""
    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        for n in range(8):
            loop.call_later(0.05 * (n + 1), queue.put_nowait, n)
        await asyncio.sleep(0.05 * 8 + 0.02)  # busy elsewhere for ~3 waits while all 8 arrive
        taken = [queue.get_nowait() for _ in range(queue.qsize())]
        watch.close()
        return taken

    assert asyncio.run(scenario()) == list(range(8))


def test_silence_for_a_whole_wait_queues_one_stall_timed_from_the_last_arrival():
    async def scenario() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        loop.call_later(0.1, queue.put_nowait, "a")  # the deadline moves to 0.1 + WAIT_S
        await asyncio.sleep(0.1 + 2 * WAIT_S)  # the consumer is late: "a" and the stall wait for it
        taken = [await queue.get(), await queue.get()]
        await asyncio.sleep(2 * WAIT_S)
        watch.close()
        return taken, queue.qsize()

    taken, left = asyncio.run(scenario())
    assert taken == ["a", _STALLED] and left == 0  # after what came before it; one stall, not one per check


def test_the_stall_comes_one_wait_after_the_last_message():
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        loop.call_later(0.1, queue.put_nowait, "a")
        assert await queue.get() == "a"
        arrived = queue.last_put
        assert await queue.get() is _STALLED
        watch.close()
        return loop.time() - arrived

    waited = asyncio.run(scenario())
    assert WAIT_S - 0.02 <= waited < 3 * WAIT_S, waited  # from the last message, not from the first timer


def test_the_deadline_follows_the_worker_wait_as_it_changes():
    """A worker's expected step time can change mid-request (a role flip, a new profile): each
    check asks again."""
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        queue = Inbox()
        waits = iter([0.05, 0.3, 0.3, 0.3])
        start = loop.time()
        watch = _StallWatch(queue, lambda: next(waits))
        assert await queue.get() is _STALLED
        watch.close()
        return loop.time() - start

    assert 0.25 <= asyncio.run(scenario()) < 0.6
