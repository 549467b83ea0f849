"""A stream's inbox (dyn.frontend.inbox): FIFO, one waiting consumer, nothing lost to a cancel."""

from __future__ import annotations

import asyncio

import pytest

from dyn.frontend.inbox import QUIET_MAX, Inbox


def test_items_come_out_in_order_and_a_waiting_get_wakes():
    async def scenario() -> list:
        inbox = Inbox()
        inbox.put_nowait(1)
        inbox.put_nowait(2)
        got = [inbox.qsize(), await inbox.get(), inbox.get_nowait(), inbox.empty()]
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, inbox.put_nowait, 3)
        loop.call_later(0.01, inbox.put_nowait, 4)
        got += [await inbox.get(), await inbox.get(), inbox.empty()]
        with pytest.raises(IndexError):
            inbox.get_nowait()
        return got

    assert asyncio.run(scenario()) == [2, 1, 2, True, 3, 4, True]


def test_an_item_put_as_the_waiting_get_times_out_is_kept_for_the_next_get():
    """The first-token deadline cancels a waiting get; what arrives in that same turn of the
    loop must still be read by the retry (WorkerStream extends the deadline and waits again)."""
    async def scenario() -> object:
        inbox = Inbox()
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)  # waiting now
        getter.cancel()
        inbox.put_nowait("late")  # before the cancelled get has run again
        with pytest.raises(asyncio.CancelledError):
            await getter
        return await asyncio.wait_for(inbox.get(), 1.0)

    assert asyncio.run(scenario()) == "late"


def test_a_quiet_type_waits_unseen_until_another_item_or_the_cap():
    """A non-streaming request's tokens do not wake its task one by one: its end does (or
    QUIET_MAX waiting tokens, so a worker that never ends is still looked at)."""
    async def scenario() -> tuple[list, list]:
        inbox = Inbox()
        inbox.quiet = int
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        for n in range(5):
            inbox.put_nowait(n)
        await asyncio.sleep(0.01)
        woken_early = getter.done()
        inbox.put_nowait("end")
        first = await asyncio.wait_for(getter, 1.0)
        ends = [woken_early, first, [inbox.get_nowait() for _ in range(inbox.qsize())]]

        capped = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        for n in range(QUIET_MAX):
            inbox.put_nowait(n)
            await asyncio.sleep(0)
            if capped.done():
                break
        return ends, [capped.done(), n + 1, inbox.qsize() + 1]  # (+1: the one the getter took)

    ends, capped = asyncio.run(scenario())
    assert ends == [False, 0, [1, 2, 3, 4, "end"]]
    assert capped == [True, QUIET_MAX, QUIET_MAX]  # woken by the QUIET_MAX-th, not before
