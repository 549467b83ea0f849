"""KV-event messages: workers PUBlish what their KV cache holds, per tier.

Each worker numbers its batches (`seq`, from 0) within an `epoch` that grows
at every start (its start time in ns). A subscriber that sees a new epoch or a gap in seq asks the
worker for a snapshot (over the request plane) and replaces that worker's
view; events are then applied from the snapshot's seq onwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dyn.control.codec import Codec, Message

Tier = Literal["device", "host", "disk"]


@dataclass(slots=True)
class KvEventBatch(Message):
    TYPE: ClassVar[str] = "kv_events"
    worker_id: str
    epoch: int
    seq: int
    runs: list[list[int]] = field(default_factory=list)
    """In order: [op (0 stored, 1 removed), tier code, parent hash or -1, hash, hash, ...]."""


@dataclass(slots=True)
class KvSnapshotRequest(Message):
    TYPE: ClassVar[str] = "kv_snapshot_request"
    worker_id: str


@dataclass(slots=True)
class KvSnapshot(Message):
    TYPE: ClassVar[str] = "kv_snapshot"
    worker_id: str
    epoch: int
    seq: int
    """Last batch included (-1: none); batches with a greater seq apply on top."""
    blocks: dict[str, list[int]] = field(default_factory=dict)
    """tier -> block hashes held in that tier."""


OP_STORED, OP_REMOVED = 0, 1
TIER_CODES: dict[str, int] = {"device": 0, "host": 1, "disk": 2}
TIER_NAMES: tuple[str, ...] = ("device", "host", "disk")

KV_EVENT_CODEC = Codec([KvEventBatch, KvSnapshotRequest, KvSnapshot])
