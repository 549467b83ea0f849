"""Shuttle wire messages (msgpack via dyn.control.codec; no pickle).

One transfer on one DEALER(receiver) <-> ROUTER(sender) connection:

    receiver                                  sender
    Pull(offer_id, missing_idx, transport,
         credit_bytes, shm_mode)       --->
                                       <---   Blocks(seq, idx, hashes, checksums | generation)
                                              [+ payload frames on tcp; a ring slot or the
                                               pinned blocks' addresses on shm]
    Credit(bytes, slot)                --->   (frees in-flight budget / the ring slot;
                                               none after the last chunk)
                                       <---   End(num_blocks)      or Reject(reason)
    Done(ok, reason)                   --->   (the offer is unpinned either way)

The OfferDescriptor travels separately, inside the request plane's
GenerateRequest.kv_source, as a plain dict (to_dict / from_dict). On one
host an offer can carry a direct-read plan (`direct`): the receiver then
reads the blocks at once and only sends Taken(offer_id, ok) afterwards.

Integrity is explicit: payloads that cross a wire (tcp, nixl) carry an
xxh3_64 checksum per block, recomputed where the block landed (the offer's
`checksum`). On shm the offer lists the modes its sender serves
(`shm_modes`, best first) and the Pull names the one this transfer uses:
  "direct"        the receiver reads the pinned blocks with process_vm_readv
                  (dyn.shuttle.cma), one copy; a generation fence per offer
                  (its plan) or per transfer (after a Pull) proves the sender
                  did not unpin them during the read;
  "ring"          through the sender's ring; the slot's generation fence
                  (dyn.shuttle.ring) proves it was not rewritten during the copy;
  "ring+xxh3_64"  through the ring, with content checksums as on tcp.
Each Blocks carries what its mode needs. A peer of another dyn version fails
clearly: an old receiver refuses the new offer field, a new receiver refuses
an offer that declares no shm modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from dyn import PROTOCOL_VERSION
from dyn.control.codec import Codec, Message
from dyn.errors import ProtocolError
from dyn.shuttle.blocks import CHECKSUM

SHM_DIRECT = "direct"
SHM_RING = "ring"
SHM_RING_XXH3 = "ring+xxh3_64"
SHM_MODES = (SHM_DIRECT, SHM_RING, SHM_RING_XXH3)
"""Best first; a receiver asks for its configured mode or the next one down the sender serves."""

MAX_CONTROL_BYTES = 16 * 1024 * 1024
"""A control frame lists at most a few hundred thousand blocks; payloads are separate frames."""


@dataclass(frozen=True, slots=True)
class OfferDescriptor(Message):
    """What a decode worker needs to pull one request's KV from a prefill worker."""

    TYPE: ClassVar[str] = "shuttle.offer"
    request_id: str
    offer_id: str
    """Unique per offer (a request id can be offered again after a retry)."""
    block_hashes: list[int]
    block_bytes: int
    address: str
    """ZMQ endpoint of the sender, e.g. tcp://10.0.0.5:7100."""
    host_id: str
    """Identifies the sender's host: shm and cuda_ipc need the receiver on the same one."""
    transports: list[str] = field(default_factory=list)
    """Transports this sender can serve."""
    checksum: str = CHECKSUM
    """Content checksum of payloads that cross a wire (tcp, nixl), and of shm's "ring+xxh3_64"."""
    shm_modes: list[str] = field(default_factory=list)
    """SHM_MODES this sender serves for this offer, best first; empty from a sender that predates
    them (the receiver then refuses the offer rather than guess)."""
    direct: list[Any] = field(default_factory=list)
    """shm "direct" without a round trip: [fence segment, fence slot, its offset, its generation,
    the sender's identity token (hex), one source address per block]; empty when not offered."""
    node: str = ""
    """Topology node of the sending worker ("": unknown; the receiver then picks by host id)."""
    gpus: list[int] = field(default_factory=list)
    """GPU indices of the sending worker on that node (the topology path's other end)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OfferDescriptor":
        """Validate an untrusted dict (e.g. GenerateRequest.kv_source); raises ProtocolError."""
        if not isinstance(data, dict):
            raise ProtocolError(f"kv_source: expected a map, got {type(data).__name__}")
        frame = msgpack.packb([PROTOCOL_VERSION, cls.TYPE, data], use_bin_type=True)
        desc = CODEC.decode_as(frame, cls)
        if desc.block_bytes <= 0:
            raise ProtocolError(f"{cls.TYPE}.block_bytes: must be positive, got {desc.block_bytes}")
        if not desc.address.startswith(("tcp://", "ipc://")):
            raise ProtocolError(f"{cls.TYPE}.address: {desc.address!r} is not a tcp:// or ipc:// endpoint")
        bad = [h for h in desc.block_hashes if not 0 <= h < 1 << 64]
        if bad:
            raise ProtocolError(f"{cls.TYPE}.block_hashes: {bad[0]} is not a 64-bit block hash")
        return desc


@dataclass(slots=True)
class Pull(Message):
    TYPE: ClassVar[str] = "shuttle.pull"
    offer_id: str
    transfer_id: str
    missing_idx: list[int]
    transport: str
    credit_bytes: int
    """Payload bytes the sender may have in flight before the next Credit."""
    host_id: str
    shm_mode: str = ""
    """shm: how this transfer moves and verifies payloads (SHM_MODES); "" on other transports."""


@dataclass(slots=True)
class Blocks(Message):
    """A chunk of blocks. Payloads follow as frames (tcp) or sit in a ring slot (shm)."""

    TYPE: ClassVar[str] = "shuttle.blocks"
    transfer_id: str
    seq: int
    block_idx: list[int]
    block_hashes: list[int]
    checksums: list[int]
    """One per block, except in shm's fenced modes ("direct", "ring")."""
    segment: str = ""
    """shm: the ring's /dev/shm name."""
    slot: int = -1
    """shm: ring slot holding the payloads back to back ("direct": the transfer's fence slot in
    the sender's fence table, named by segment); -1 on tcp."""
    offset: int = 0
    """shm: byte offset of the slot in the segment."""
    generation: int = -1
    """shm "ring": the slot's (even) generation once written; "direct": the transfer's fence."""
    handles: list[Any] = field(default_factory=list)
    """cuda_ipc / nixl / shm "direct": transport-specific source locations, one per block."""
    metadata: bytes = b""
    """cuda_ipc / nixl: what the receiver needs once per transfer (IPC handles, agent metadata)."""


@dataclass(slots=True)
class Credit(Message):
    TYPE: ClassVar[str] = "shuttle.credit"
    transfer_id: str
    num_bytes: int
    slot: int = -1


@dataclass(slots=True)
class End(Message):
    TYPE: ClassVar[str] = "shuttle.end"
    transfer_id: str
    num_blocks: int


@dataclass(slots=True)
class Reject(Message):
    TYPE: ClassVar[str] = "shuttle.reject"
    transfer_id: str
    reason: str


@dataclass(slots=True)
class Taken(Message):
    """shm "direct" from the offer's plan: the receiver read the blocks itself (or failed to);
    the sender unpins the offer. No Pull, no reply."""

    TYPE: ClassVar[str] = "shuttle.taken"
    offer_id: str
    ok: bool
    num_blocks: int
    reason: str = ""


@dataclass(slots=True)
class Done(Message):
    TYPE: ClassVar[str] = "shuttle.done"
    transfer_id: str
    ok: bool
    reason: str = ""


CODEC = Codec([OfferDescriptor, Pull, Blocks, Credit, End, Reject, Done, Taken],
              max_message_bytes=MAX_CONTROL_BYTES)
