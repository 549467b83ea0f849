"""The messages of one request stream, from the worker pool's reader to the request's task.

asyncio.Queue's put_nowait/get_nowait/get/empty, for the one producer and one consumer a stream
has. A Queue does more per message than a stream needs (bounds, task_done bookkeeping, a deque
of getters) and looks the running loop up on every get that waits: in CPython 3.11 that lookup
is a getpid() system call, once per streamed token (~2% of the frontend's CPU when every token
reaches a waiting stream, scripts/bench_frontend.py --step-ms 20). The inbox keeps its loop.

It also stamps each arrival (`last_put`: the stall deadline counts from the worker's last
message), and can keep one type of item from waking its consumer (`quiet`): a non-streaming
request needs its tokens only at the end, not one task wake-up and one pass through the
request's generators per token.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


QUIET_MAX = 256
"""Items that may wait unseen in a quiet inbox before its consumer is woken anyway (a worker that
overshoots max_tokens and never ends is still cut off by the frontend)."""


class Inbox:
    __slots__ = ("_items", "_waiter", "_loop", "last_put", "quiet")

    def __init__(self) -> None:
        """Made on the event loop's thread, in a coroutine (as WorkerPool.open is)."""
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self.last_put = self._loop.time()
        """Loop time of the latest put (of the inbox's making before any)."""
        self.quiet: type | None = None
        """Items of this type do not wake a waiting consumer (until QUIET_MAX of them wait)."""

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self.last_put = self._loop.time()
        waiter = self._waiter
        if waiter is not None and (type(item) is not self.quiet or len(self._items) >= QUIET_MAX):
            self._waiter = None
            if not waiter.done():  # (cancelled with its consumer)
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Any:
        """The oldest item; IndexError when there is none."""
        return self._items.popleft()

    async def get(self) -> Any:
        """The oldest item, waiting for one. One consumer at a time."""
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()
