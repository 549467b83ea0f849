"""The shm transport's memory: a sender-owned ring of slots in /dev/shm.

    /dev/shm/dyn-shuttle-<pid>-<rand>
    +--------+----------+----------+-----+----------+
    | header |  slot 0  |  slot 1  | ... | slot n-1 |    slot = k whole blocks, back to back
    +--------+----------+----------+-----+----------+
    header (whole pages): magic, num_slots, slot_bytes, then one uint64 generation per slot

The sender copies blocks into a free slot and names it in a Blocks message;
the receiver copies them out into its destination views and sends a Credit
naming the slot, which frees it. The ring is allocated and pre-faulted once
(first touch of fresh pages is 5-10x slower than a copy), so its size bounds
the sender's memory whatever the load. A transfer that dies gives its slots
back, so a slot can be rewritten while a slow receiver still copies out of it.

Each slot has a generation fence, as in a seqlock: the sender makes it odd
before writing the slot and even (one more) after, and the Blocks message
names that even value; the receiver checks the slot still holds it before
and after its copy. A slot rewritten during the copy (reused too early), or
left mid-write by a sender that died, fails that check at no cost per byte.
This is sound where stores are seen in order and loads are not reordered with
older loads (x86-64's TSO), with a locked instruction (FENCE) around each
side's copy to order non-temporal stores; elsewhere (aarch64) the sender does
not offer the fence and shm keeps content checksums (FENCE_SOUND).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import platform
import re
import secrets
import threading

import numpy as np

from dyn.launch.local import remove_files_of_dead_processes
from dyn.shuttle.errors import TransferError

SHM_DIR = "/dev/shm"
_PREFIX = "dyn-shuttle-"
_NAME = re.compile(r"^dyn-shuttle-(\d+)-[0-9a-f]{12}$")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MAGIC = int.from_bytes(b"dynring1", "little")
_PAGE = 4096
_HEADER_WORDS = 3

FENCE_SOUND = platform.machine().lower() in ("x86_64", "amd64")
"""Whether the generation fence is sound on this CPU (see the module docstring)."""


def header_bytes(num_slots: int) -> int:
    """Bytes before slot 0: magic, num_slots, slot_bytes and one generation per slot, in whole pages."""
    return -(-(_HEADER_WORDS + num_slots) * 8 // _PAGE) * _PAGE


_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier: on x86-64 a locked instruction (a CPython lock's acquire is one)
    orders every load and store, non-temporal ones included, before it against every one after."""
    _fence_lock.acquire()
    _fence_lock.release()


class ShmRing:
    """A bounded pool of equal slots in one shared-memory segment (sender side)."""

    def __init__(self, slot_bytes: int, num_slots: int, *, shm_dir: str = SHM_DIR) -> None:
        assert slot_bytes > 0 and num_slots > 0
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = os.path.join(shm_dir, self.name)
        self.header_bytes = header_bytes(num_slots)
        size = self.header_bytes + slot_bytes * num_slots
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
        header = self.array[:self.header_bytes].view(np.uint64)
        header[:_HEADER_WORDS] = (_MAGIC, num_slots, slot_bytes)
        self._generations = header[_HEADER_WORDS:_HEADER_WORDS + num_slots]
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

    def try_allocate(self) -> int | None:
        """A free slot now, or None."""
        try:
            return self._free.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots
        self._free.put_nowait(slot)

    def slot_offset(self, slot: int) -> int:
        return self.header_bytes + slot * self.slot_bytes

    def slot_array(self, slot: int) -> np.ndarray:
        start = self.slot_offset(slot)
        return self.array[start:start + self.slot_bytes]

    def begin_write(self, slot: int) -> None:
        """Mark `slot` as being written (odd generation) before any of its bytes change."""
        self._generations[slot] += 1
        fence()

    def end_write(self, slot: int) -> int:
        """Mark `slot` as written; returns the (even) generation its Blocks message names."""
        fence()
        self._generations[slot] += 1
        return int(self._generations[slot])

    def generation(self, slot: int) -> int:
        return int(self._generations[slot])

    def close(self) -> None:
        """Unlink the segment; receivers that still map it keep their mapping."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.array = np.empty(0, dtype=np.uint8)
        self._generations = np.empty(0, dtype=np.uint64)
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
        self._headers: dict[str, tuple[np.ndarray, int, int]] = {}
        """Per segment: its generation array, where slot 0 starts, slot_bytes."""

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
                self.forget(next(iter(self._maps)))
            self._maps[name] = (mapped, np.frombuffer(mapped, dtype=np.uint8))
        array = self._maps[name][1]
        if offset < 0 or num_bytes < 0 or offset + num_bytes > array.size:
            raise ValueError(f"region [{offset}, {offset + num_bytes}) outside segment {name!r} "
                             f"of {array.size} bytes")
        return array[offset:offset + num_bytes]

    def fenced_slot(self, name: str, slot: int, offset: int, num_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(the first num_bytes of `slot` of segment `name`, the ring's live generation array);
        ValueError unless the segment has a ring header and `offset` is that slot's start."""
        header = self._headers.get(name)
        if header is None:
            self.region(name, 0, 0)  # maps the segment
            whole = self._maps[name][1]
            words = whole[:8 * _HEADER_WORDS].view(np.uint64) if whole.size >= 8 * _HEADER_WORDS else [0] * 3
            magic, num_slots, slot_bytes = (int(w) for w in words)
            if magic != _MAGIC or whole.size < header_bytes(num_slots) + num_slots * slot_bytes:
                raise ValueError(f"segment {name!r} has no dyn ring header")
            gens = whole[8 * _HEADER_WORDS:8 * (_HEADER_WORDS + num_slots)].view(np.uint64)
            header = self._headers[name] = (gens, header_bytes(num_slots), slot_bytes)
        gens, first, slot_bytes = header
        if not 0 <= slot < gens.size or offset != first + slot * slot_bytes or not 0 <= num_bytes <= slot_bytes:
            raise ValueError(f"slot {slot} at offset {offset} ({num_bytes} bytes) is not a slot of "
                             f"{name!r} ({gens.size} slots of {slot_bytes} bytes)")
        return self.region(name, offset, num_bytes), gens

    def forget(self, name: str) -> None:
        self._maps.pop(name, None)
        self._headers.pop(name, None)

    def close(self) -> None:
        self._maps.clear()
        self._headers.clear()


def segment_pid(name: str) -> int:
    """The pid of the process that created segment `name`; ValueError for a foreign name."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"segment name {name!r} is not a dyn shuttle ring")
    return int(match.group(1))


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink rings whose owning process is gone (a killed sender cannot clean up)."""
    return remove_files_of_dead_processes(shm_dir, _NAME)
