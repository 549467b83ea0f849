"""Disk KV tier: one preallocated file of fixed-size slots under the node's KV disk path.

    file: [slot 0][slot 1]...   slot = header (block hash u64, crc32 u32, pad) + payload

Eviction and expiry follow dyn.kv.retention (expired, then low priority,
then least recently used); an expired block is dropped with a removal event.
The index lives in memory (a worker restart starts the tier empty: its
blocks were announced under the old epoch anyway). Every fetch checks the
stored hash and the payload's crc32, so a corrupted block is dropped and
recomputed, never served.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from dyn.kv.buffers import as_array, copy_into
from dyn.kv.events import KvEvent, KvEventListener, LowerTier
from dyn.kv.retention import Retention, RetentionLru

_HEADER = struct.Struct("<QI4x")


class DiskTier(LowerTier):
    def __init__(self, directory: str | Path, block_bytes: int, capacity_bytes: int, *,
                 name: str = "kv", ttl_s: float | None = None, listener: KvEventListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_bytes = block_bytes
        self.slot_bytes = _HEADER.size + block_bytes
        self.num_slots = max(0, capacity_bytes // self.slot_bytes)
        self.path = Path(directory) / f"{name}.blocks"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.num_slots * self.slot_bytes)
        self._index: dict[int, int] = {}  # hash -> slot
        self._order: RetentionLru[int] = RetentionLru()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._scratch = np.empty(self.slot_bytes, dtype=np.uint8)
        self._ttl_s = ttl_s
        self._listener = listener
        self._clock = clock
        self.num_corrupt = 0
        self.num_fetched = 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return len(self._index) * self.slot_bytes

    def set_listener(self, listener: KvEventListener | None) -> None:
        self._listener = listener

    def offload(self, block_hash: int, parent_hash: int | None, view: object, priority: int = 0,
                ttl_s: float | None = None) -> None:
        if self.num_slots == 0:
            return
        now = self._clock()
        expires_at = Retention(priority, ttl_s).expires_at(now, self._ttl_s)
        if block_hash in self._index:
            if not self._order.is_expired(block_hash, now):
                self._order.add(block_hash, max(priority, self._order.priority(block_hash) or 0),
                                expires_at)
                return
            self._drop(block_hash)
        if not self._free_slots:
            victim = self._order.pop_victim(now)
            assert victim is not None, "full disk tier with an empty eviction order"
            self._drop(victim)
        slot = self._free_slots.pop()
        payload = self._scratch[_HEADER.size:]
        copy_into(payload, view)
        self._scratch[:_HEADER.size] = np.frombuffer(
            _HEADER.pack(block_hash & (2**64 - 1), zlib.crc32(payload)), dtype=np.uint8)
        os.pwrite(self._fd, memoryview(self._scratch), slot * self.slot_bytes)
        self._index[block_hash] = slot
        self._order.add(block_hash, priority, expires_at)
        self._emit("stored", block_hash, parent_hash)

    def fetch(self, block_hash: int, dest_view: object) -> bool:
        if not self.contains(block_hash):
            return False
        slot = self._index[block_hash]
        data = os.pread(self._fd, self.slot_bytes, slot * self.slot_bytes)
        stored_hash, crc = _HEADER.unpack_from(data)
        payload = memoryview(data)[_HEADER.size:]
        if len(data) != self.slot_bytes or stored_hash != block_hash & (2**64 - 1) or zlib.crc32(payload) != crc:
            self.num_corrupt += 1
            self._drop(block_hash)
            return False
        copy_into(dest_view, as_array(payload))
        self._order.touch(block_hash)
        self.num_fetched += 1
        return True

    def expire(self) -> int:
        expired = self._order.pop_expired(self._clock())
        for block_hash in expired:
            self._drop(block_hash)
        return len(expired)

    def release(self, block_hashes: list[int]) -> None:
        default_expiry = Retention().expires_at(self._clock(), self._ttl_s)
        for block_hash in block_hashes:
            if block_hash in self._order:
                self._order.add(block_hash, 0, default_expiry)

    def contains(self, block_hash: int) -> bool:
        if block_hash not in self._index:
            return False
        if self._order.is_expired(block_hash, self._clock()):
            self._drop(block_hash)
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)

    def _drop(self, block_hash: int) -> None:
        slot = self._index.pop(block_hash)
        self._order.remove(block_hash)
        self._free_slots.append(slot)
        self._emit("removed", block_hash, None)

    def _emit(self, kind: str, block_hash: int, parent: int | None) -> None:
        if self._listener is not None:
            self._listener(KvEvent(kind=kind, block_hashes=[block_hash], parent_hash=parent, tier="disk"))
