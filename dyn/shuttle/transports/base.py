"""The interface every transport implements, and the per-transfer state both sides share.

The sender core (dyn.shuttle.sender) owns sockets, offers and credit
accounting; a transport only decides how payload bytes get from the source
views to the receiver: frames on the socket (tcp), a shared ring (shm), IPC
handles (cuda_ipc), RDMA/UCX (nixl). The receiver core checks order and
hashes before a transport touches a destination view, and that each chunk
carries what the transfer's integrity mode needs (dyn.shuttle.wire); every transport then
verifies it: payload checksums after writing, or shm's slot generation
around the copy.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dyn.shuttle.errors import TransferError
from dyn.shuttle.wire import Blocks


@dataclass(slots=True, eq=False)
class SendJob:
    """One transfer being served: which blocks, to whom, and how much may be in flight."""

    transfer_id: str
    request_id: str
    block_idx: list[int]
    block_hashes: list[int]
    """All offered hashes (index with block_idx)."""
    block_views: list[object]
    block_bytes: int
    chunk_bytes: int
    """Payload bytes per Blocks message (whole blocks, at least one)."""
    stall_timeout_s: float
    send: Callable[[list[Any]], Awaitable[None]]
    """Sends [Blocks message, *payload frames] to this receiver."""
    shm_mode: str = ""
    """The receiver's Pull.shm_mode (shm only): how payloads move and what each Blocks carries."""
    credit: int = 0
    window_bytes: int = 0
    """The receiver's whole credit window (Pull.credit_bytes): no chunk may be larger."""
    held_slots: set[int] = field(default_factory=set)
    fence_slot: int = -1
    """shm "direct": this transfer's slot in the sender's fence table."""
    credit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[Any] | None = None
    """Resolved with the receiver's Done message."""

    def grant(self, num_bytes: int) -> None:
        self.credit += num_bytes
        self.credit_changed.set()

    async def spend(self, num_bytes: int) -> None:
        """Wait until the receiver allows `num_bytes` more in flight (backpressure)."""
        while self.credit < num_bytes:
            self.credit_changed.clear()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                # (a withdrawn offer) when the credit arrives at the same moment.
                async with asyncio.timeout(self.stall_timeout_s):
                    await self.credit_changed.wait()
            except TimeoutError:
                raise TransferError(f"receiver granted no credit for {self.stall_timeout_s:.1f}s",
                                    reason="timeout", request_id=self.request_id) from None
        self.credit -= num_bytes

    def chunks(self) -> Iterator[list[int]]:
        """block_idx cut into runs of at most chunk_bytes (at least one block each)."""
        per_chunk = max(1, self.chunk_bytes // self.block_bytes)
        for start in range(0, len(self.block_idx), per_chunk):
            yield self.block_idx[start:start + per_chunk]


class SendTransport(ABC):
    """Sender half of a transport."""

    name: str

    @abstractmethod
    async def send(self, job: SendJob) -> None:
        """Stream every block of `job` as Blocks messages, honouring job.spend().

        Raises TransferError when the transfer cannot go on; the core then
        releases whatever the job holds and tells the receiver.
        """

    def prepare(self) -> None:
        """Allocate and pre-fault memory up front, so the first transfer runs at full speed."""

    def on_credit(self, job: SendJob, slot: int) -> None:
        """The receiver has finished with `slot` of `job` (shm ring slots)."""

    def release(self, job: SendJob) -> None:
        """Give back resources a finished or failed job still holds (ring slots)."""

    def close(self) -> None:
        """Free the transport's memory (called once, when the sender closes)."""


class RecvTransport(ABC):
    """Receiver half of a transport."""

    name: str

    @abstractmethod
    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                block_bytes: int, request_id: str) -> None:
        """Write the payloads of `msg` into `dest_views` (one per block, in order) and
        verify them (msg.checksums, or shm's msg.generation); TransferError on any mismatch."""

    def prepare(self) -> None:
        """Pay start-up costs (a NIXL agent) before the first pull instead of during it."""

    def finish(self, transfer_id: str) -> None:
        """The transfer ended (either way): drop its per-transfer state."""

    def close(self) -> None:
        """Drop cached mappings or handles."""
