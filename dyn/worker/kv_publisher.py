"""Publishes the worker's KV events in batches and answers snapshot requests.

The engine calls `listener` on its own thread; events are queued and sent by
an asyncio task `flush_interval_s` after the first of them (sooner when a batch
is full). An idle worker's task sleeps until an event comes (no timer ticking
100 times a second in each of a rack's workers).
A mirror of what each tier holds, kept from the same events, answers
snapshots without asking the engine thread.
"""

from __future__ import annotations

import asyncio
import time
import threading

import zmq
import zmq.asyncio

from dyn.control.client import wait_event
from dyn.control.kv_events import (KV_EVENT_CODEC, OP_REMOVED, OP_STORED, TIER_CODES, KvEventBatch,
                                   KvSnapshot)
from dyn.control.sockets import Security, server_socket
from dyn.kv.events import KvEvent

MAX_BATCH_RUNS = 256


class KvEventPublisher:
    def __init__(self, ctx: zmq.asyncio.Context, bind_host: str, security: Security, worker_id: str,
                 *, flush_interval_s: float = 0.01) -> None:
        self.worker_id = worker_id
        self.epoch = time.time_ns()
        """Grows with every start, so subscribers see a restart as a new epoch."""
        self.seq = -1
        """Seq of the last published batch (-1: none yet); batches count from 0."""
        self._sock = server_socket(ctx, zmq.PUB, f"tcp://{bind_host}:*", security)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pending: list[KvEvent] = []
        self._lock = threading.Lock()
        self._held: dict[str, set[int]] = {tier: set() for tier in TIER_CODES}
        self._flush_interval_s = flush_interval_s
        self._wake = asyncio.Event()
        """Set when the queue goes from empty to non-empty."""
        self._full = asyncio.Event()
        """Set when the queue holds a full batch."""
        self._aio = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self.events_published = 0

    def listener(self, event: KvEvent) -> None:
        """Engine-thread callback (KvEventListener); also called on the event loop's thread
        (an engine stepped there, dyn.worker.inline_loop), which needs no wake-up call."""
        with self._lock:
            self._pending.append(event)
            num = len(self._pending)
        if num == 1 or num == MAX_BATCH_RUNS:
            flag = self._wake if num == 1 else self._full
            if threading.get_ident() == self._thread_id:
                flag.set()
            else:
                self._aio.call_soon_threadsafe(flag.set)

    def snapshot(self) -> KvSnapshot:
        """What every tier holds as of the last published batch."""
        return KvSnapshot(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq,
                          blocks={tier: sorted(held) for tier, held in self._held.items()})

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            # Gather the next steps' events into the same batch, unless it is full already.
            await wait_event(self._full, self._flush_interval_s)
            self._wake.clear()
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        for start in range(0, len(events), MAX_BATCH_RUNS):
            batch = self._batch(events[start:start + MAX_BATCH_RUNS])
            await self._sock.send(KV_EVENT_CODEC.encode(batch))
            self.events_published += len(batch.runs)

    def close(self) -> None:
        self._sock.close(linger=0)

    def _batch(self, events: list[KvEvent]) -> KvEventBatch:
        self.seq += 1
        batch = KvEventBatch(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq)
        for event in events:
            code = TIER_CODES[event.tier]
            held = self._held[event.tier]
            parent = -1 if event.parent_hash is None else event.parent_hash
            if event.kind == "stored":
                batch.runs.append([OP_STORED, code, parent, *event.block_hashes])
                held.update(event.block_hashes)
            else:
                batch.runs.append([OP_REMOVED, code, parent, *event.block_hashes])
                held.difference_update(event.block_hashes)
        return batch
