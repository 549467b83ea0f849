"""Wire KV-event messages (dyn.control.kv_events) to the router's own types."""

from __future__ import annotations

from dyn.control import kv_events as wire
from dyn.kv.events import KvEvent
from dyn.router.errors import KvEventError
from dyn.router.events import KvEventBatch, KvSnapshot


def batch_from_wire(msg: wire.KvEventBatch) -> KvEventBatch:
    """Unpack compact [op, tier, parent, hashes...] runs; KvEventError when a run is malformed."""
    events: list[KvEvent] = []
    for run in msg.runs:
        if len(run) < 4 or run[0] not in (wire.OP_STORED, wire.OP_REMOVED):
            raise KvEventError(f"worker {msg.worker_id}: malformed event run (need op 0|1, tier, parent "
                               f"and at least one hash; got {len(run)} ints)")
        kind = "stored" if run[0] == wire.OP_STORED else "removed"
        parent = None if run[2] == -1 else run[2]
        events.append(KvEvent(kind, list(run[3:]), parent_hash=parent, tier=_tier(run[1], msg.worker_id)))
    return KvEventBatch(worker_id=msg.worker_id, seq=msg.seq, events=events, epoch=msg.epoch)


def snapshot_from_wire(msg: wire.KvSnapshot) -> KvSnapshot:
    unknown = set(msg.blocks) - set(wire.TIER_NAMES)
    if unknown:
        raise KvEventError(f"worker {msg.worker_id}: snapshot names unknown tiers {sorted(unknown)}")
    return KvSnapshot(worker_id=msg.worker_id, seq=msg.seq, blocks=dict(msg.blocks), epoch=msg.epoch)


def _tier(code: int, worker_id: str) -> str:
    if not 0 <= code < len(wire.TIER_NAMES):
        raise KvEventError(f"worker {worker_id}: unknown tier code {code}")
    return wire.TIER_NAMES[code]
