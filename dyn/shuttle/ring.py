"""The shm transport's memory: a sender-owned ring of slots in /dev/shm.

    /dev/shm/dyn-shuttle-<pid>-<rand>
    +----------+----------+-----+----------+
    |  slot 0  |  slot 1  | ... | slot n-1 |    slot = k whole blocks, back to back
    +----------+----------+-----+----------+

The sender copies blocks into a free slot and names it in a Blocks message;
the receiver copies them out into its destination views and sends a Credit
naming the slot, which frees it. The ring is allocated and pre-faulted once
(first touch of fresh pages is 5-10x slower than a copy), so its size bounds
the sender's memory whatever the load. A transfer that dies gives its slots
back; a slot reused too early is caught by the receiver's checksum.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import secrets

import numpy as np

from dyn.launch.local import pid_alive
from dyn.shuttle.errors import TransferError

SHM_DIR = "/dev/shm"
_PREFIX = "dyn-shuttle-"
_NAME = re.compile(r"^dyn-shuttle-(\d+)-[0-9a-f]{12}$")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class ShmRing:
    """A bounded pool of equal slots in one shared-memory segment (sender side)."""

    def __init__(self, slot_bytes: int, num_slots: int, *, shm_dir: str = SHM_DIR) -> None:
        assert slot_bytes > 0 and num_slots > 0
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = os.path.join(shm_dir, self.name)
        size = slot_bytes * num_slots
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except OSError as exc:
            os.unlink(self.path)
            raise TransferError(f"cannot allocate a {size >> 20} MiB shm ring in {shm_dir}: {exc}",
                                reason="no_memory") from None
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.array.fill(0)  # fault every page in now, not during the first transfer
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(num_slots):
            self._free.put_nowait(slot)

    @property
    def num_free_slots(self) -> int:
        return self._free.qsize()

    async def allocate(self, timeout_s: float) -> int:
        """A free slot; waits (backpressure) up to timeout_s, then TimeoutError."""
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
            return await self._free.get()

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots
        self._free.put_nowait(slot)

    def slot_array(self, slot: int) -> np.ndarray:
        start = slot * self.slot_bytes
        return self.array[start:start + self.slot_bytes]

    def close(self) -> None:
        """Unlink the segment; receivers that still map it keep their mapping."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._map.close()
        except BufferError:  # a numpy view is still alive somewhere; the unmap happens with it
            pass


class ShmAttachments:
    """Receiver side: read-only maps of senders' rings, opened once and cached by name."""

    def __init__(self, *, shm_dir: str = SHM_DIR, max_maps: int = 64) -> None:
        self._dir = shm_dir
        self._max_maps = max_maps
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}

    def region(self, name: str, offset: int, num_bytes: int) -> np.ndarray:
        """Bytes [offset, offset+num_bytes) of segment `name`; ValueError when out of range."""
        if name not in self._maps:
            if not _NAME.match(name):
                raise ValueError(f"segment name {name!r} is not a dyn shuttle ring")
            fd = os.open(os.path.join(self._dir, name), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            if len(self._maps) >= self._max_maps:  # senders restart; don't pin their old rings forever
                self._maps.pop(next(iter(self._maps)))
            self._maps[name] = (mapped, np.frombuffer(mapped, dtype=np.uint8))
        array = self._maps[name][1]
        if offset < 0 or num_bytes < 0 or offset + num_bytes > array.size:
            raise ValueError(f"region [{offset}, {offset + num_bytes}) outside segment {name!r} "
                             f"of {array.size} bytes")
        return array[offset:offset + num_bytes]

    def forget(self, name: str) -> None:
        self._maps.pop(name, None)

    def close(self) -> None:
        self._maps.clear()


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink rings whose owning process is gone (a killed sender cannot clean up)."""
    removed = []
    for name in os.listdir(shm_dir):
        match = _NAME.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
