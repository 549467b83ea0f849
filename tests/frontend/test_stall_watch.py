"""The stall deadline after a stream's first message (dyn.frontend.worker_stream._StallWatch):
one timer per stream, re-armed from the consumer's stamps, instead of a timer per token."""

from __future__ import annotations

import asyncio

from dyn.frontend.inbox import Inbox
from dyn.frontend.worker_stream import _STALLED, _StallWatch

WAIT_S = 0.15


async def _take(queue: Inbox, watch: _StallWatch) -> object:
    message = await queue.get()
    watch.last = watch.loop.time()
    return message


def test_a_stream_that_keeps_coming_never_stalls():
    async def scenario() -> list[object]:
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        taken = []
        for n in range(10):  # 10 messages 0.05 s apart: 0.5 s in all, over three waits
            asyncio.get_running_loop().call_later(0.05, queue.put_nowait, n)
            taken.append(await _take(queue, watch))
        watch.close()
        await asyncio.sleep(2 * WAIT_S)
        return taken + [queue.qsize()]

    assert asyncio.run(scenario()) == [*range(10), 0]


def test_a_consumer_behind_its_queue_is_not_a_stall():
    """Messages wait in the queue while the consumer is busy (a saturated event loop, a slow
    client write) for longer than the wait: the worker is fine, nothing is declared stalled."""
    async def scenario() -> list[object]:
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        queue.put_nowait("a")
        await asyncio.sleep(3 * WAIT_S)  # busy elsewhere, "a" waiting all along
        first = await _take(queue, watch)
        queue.put_nowait("b")
        second = await _take(queue, watch)
        watch.close()
        return [first, second, queue.qsize()]

    assert asyncio.run(scenario()) == ["a", "b", 0]


def test_silence_for_a_whole_wait_queues_one_stall_in_time():
    async def scenario() -> tuple[bool, float, int]:
        loop = asyncio.get_running_loop()
        queue = Inbox()
        watch = _StallWatch(queue, lambda: WAIT_S)
        loop.call_later(0.1, queue.put_nowait, "a")
        await _take(queue, watch)  # the deadline moves to 0.1 + WAIT_S
        taken_at = loop.time()
        stalled = await queue.get() is _STALLED
        waited = loop.time() - taken_at
        await asyncio.sleep(2 * WAIT_S)
        watch.close()
        return stalled, waited, queue.qsize()

    stalled, waited, left = asyncio.run(scenario())
    assert stalled and left == 0  # one stall, not one per check
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
