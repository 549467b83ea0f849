"""KV-event messages: workers PUBlish what their KV cache holds, per tier.

Each worker numbers its batches (`seq`, from 1) within an `epoch` that is new
at every start. A subscriber that sees a new epoch or a gap in seq asks the
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
    stored: list[list[int]] = field(default_factory=list)
    """Per stored run: [tier_code, parent_hash or -1, hash, hash, ...] (hashes in prompt order)."""
    removed: list[list[int]] = field(default_factory=list)
    """Per removed run: [tier_code, hash, hash, ...]."""


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
    """Events with seq > this apply on top of the snapshot."""
    blocks: dict[str, list[int]] = field(default_factory=dict)
    """tier -> block hashes held in that tier."""


TIER_CODES: dict[str, int] = {"device": 0, "host": 1, "disk": 2}
TIER_NAMES: tuple[str, ...] = ("device", "host", "disk")

KV_EVENT_CODEC = Codec([KvEventBatch, KvSnapshotRequest, KvSnapshot])
