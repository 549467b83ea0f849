"""The first NIXL transfer makes its agent on a worker thread, once, while the event loop runs on.

Making the first agent imports NIXL and torch: 10.8 s measured on a loaded 2-core host. On the
event loop that stopped a worker's heartbeats past the daemon's deadline, and the daemon failed
the worker mid-request (tests/e2e/test_planner_live.py: 503s and 429s after "missed heartbeats").
A fake agent stands in for NIXL; the slow start is a gate the test opens, not a timer.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading

import numpy as np

from dyn.shuttle.transports import nixl
from dyn.shuttle.wire import Blocks

from shuttle_peer import make_blocks

BLOCK_BYTES = 1 << 10


class _HostAgent:
    """A NIXL agent over host memory: a READ copies between the addresses it was given."""

    def add_remote_agent(self, metadata):
        return b"peer"

    def register_memory(self, regions, mem):
        return object()

    def deregister_memory(self, reg):
        pass

    def get_xfer_descs(self, descs, mem):
        return descs

    def initialize_xfer(self, op, local, source, remote):
        return local, source

    def transfer(self, handle):
        for (dst, n, _), (src, _, _) in zip(*handle):
            ctypes.memmove(dst, src, n)
        return "DONE"

    def release_xfer_handle(self, handle):
        pass


def test_the_first_pulls_wait_for_one_agent_made_off_the_event_loop(monkeypatch):
    gate, making = threading.Event(), threading.Event()
    made: list[tuple[str, threading.Thread]] = []

    def slow_agent(prefix: str) -> _HostAgent:
        made.append((prefix, threading.current_thread()))
        making.set()
        gate.wait(5)  # opened by the test once it saw the event loop run meanwhile
        return _HostAgent()

    monkeypatch.setattr(nixl, "_new_agent", slow_agent)
    _, source = make_blocks(3, 4, BLOCK_BYTES)
    dests = [np.zeros_like(source) for _ in range(2)]

    def message(transfer_id: str) -> Blocks:
        views = [source[i] for i in range(4)]
        return Blocks(transfer_id=transfer_id, seq=0, block_idx=[0, 1, 2, 3], block_hashes=[1, 2, 3, 4],
                      checksums=nixl._checksums(views, vram=False),
                      handles=[nixl._place(v, transfer_id, i).handle for i, v in enumerate(views)], metadata=b"meta")

    async def scenario() -> None:
        rx = nixl.NixlReceiver()
        pulls = [asyncio.create_task(rx.deliver(message(f"t{k}"), [], [dest[i] for i in range(4)], BLOCK_BYTES,
                                                f"r{k}")) for k, dest in enumerate(dests)]
        assert await asyncio.to_thread(making.wait, 10)
        assert made[0][1] is not threading.current_thread(), "the agent was made on the event loop"
        for _ in range(3):  # the loop runs on (heartbeats) while the agent is being made
            await asyncio.sleep(0)
        assert not any(p.done() for p in pulls)
        gate.set()
        await asyncio.gather(*pulls)

    asyncio.run(scenario())
    assert [prefix for prefix, _ in made] == ["dyn-rx"]  # one agent for both pulls
    for dest in dests:
        assert np.array_equal(dest, source)
