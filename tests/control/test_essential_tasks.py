"""EssentialTasks: a process whose request plane or KV events died stops (to be relaunched)."""

from __future__ import annotations

import asyncio

from dyn.control.client import EssentialTasks


def test_a_task_that_dies_stops_the_process_and_says_why() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        essential = EssentialTasks(stop)

        async def dies() -> None:
            raise RuntimeError("boom")

        essential.start(dies(), "request plane")
        async with asyncio.timeout(5):
            await stop.wait()
        assert essential.error == "request plane stopped: RuntimeError('boom')"

    asyncio.run(scenario())


def test_tasks_cancelled_or_ending_while_stopping_are_no_error() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        essential = EssentialTasks(stop)
        forever = essential.start(asyncio.sleep(60), "request plane")

        async def fails_on_close() -> None:
            await stop.wait()
            raise OSError("socket closed")

        closing = essential.start(fails_on_close(), "KV events")
        await asyncio.sleep(0)
        stop.set()
        forever.cancel()
        await asyncio.gather(forever, closing, return_exceptions=True)
        assert essential.error == ""

    asyncio.run(scenario())
