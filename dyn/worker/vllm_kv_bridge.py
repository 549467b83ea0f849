"""vLLM's KV events -> dyn's KV events: the router indexes vLLM workers like every other worker.

vLLM (kv_events_config, publisher zmq) publishes batches of BlockStored /
BlockRemoved / AllBlocksCleared, numbered by a sequence, on a PUB socket and
keeps the last batches for replay on a ROUTER socket. Its block hashes are
its own (sha256 of its own chain); the router hashes prompts with
dyn.kv.hashing. BlockStored carries the blocks' token ids and parent, so the
bridge recomputes dyn's chained hash of every stored block and remembers
vLLM hash -> dyn hash per worker; removals map through that table.

Tenants: a request with a dyn salt is sent to vLLM with cache_salt
"dyn-salt-<salt>" (so vLLM isolates it too); vLLM reports it in the first
block's extra_keys, and the bridge hashes that chain with the same salt.

A gap in vLLM's sequence is filled from its replay buffer; if the buffer no
longer holds it, the bridge reports every block it knows as removed (the
index then under-reports this worker, never over-reports) and starts over.
dyn's own publisher adds epochs and snapshots on top, so a worker restart
resyncs subscribers exactly as for the torch engine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import zmq

from dyn.kv.events import KvEvent, KvEventListener
from dyn.engine.vllm_engine import SALT_PREFIX
from dyn.kv.hashing import hash_blocks

log = logging.getLogger(__name__)

_MEDIUM_TIER = {None: "device", "GPU": "device", "CPU": "host", "STORAGE": "disk"}
_END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class BridgeStats:
    batches: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    unknown_parents: int = 0
    """Stored blocks whose parent the bridge never saw (skipped: their dyn hash is unknowable)."""
    gaps: int = 0
    replayed_batches: int = 0
    resets: int = 0
    """Gaps the replay buffer could not fill: every known block reported removed."""


@dataclass(slots=True)
class HashMap:
    """vLLM block hash -> (dyn block hash, salt, tier), for one worker."""

    blocks: dict[Any, tuple[int, int, str]] = field(default_factory=dict)


class VllmKvBridge:
    """Translate one vLLM engine's KV event stream into dyn KvEvents for `listener`."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, block_size: int,
                 listener: KvEventListener, *, topic: str = "kv-events") -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.block_size = block_size
        self.listener = listener
        self.topic = topic.encode()
        self.stats = BridgeStats()
        self.map = HashMap()
        self.last_seq = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-bridge", daemon=True)
        self._decoder: Any = None

    def start(self) -> None:
        from vllm.distributed.kv_events import KVEventBatch  # the worker has vLLM loaded already
        import msgspec

        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._ctx = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._sub.connect(self.endpoint)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._sub.close(linger=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sub.poll(200):
                continue
            topic, seq_bytes, payload = self._sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if self.last_seq >= 0 and seq > self.last_seq + 1:
                self.stats.gaps += 1
                self._fill_gap(seq)
            if seq <= self.last_seq:
                continue  # already applied (replay overlap)
            self.apply(seq, self._decoder.decode(payload))

    def apply(self, seq: int, batch: Any) -> None:
        """Apply one decoded vLLM KVEventBatch (also the entry point of the tests)."""
        self.last_seq = seq
        self.stats.batches += 1
        for event in batch.events:
            kind = type(event).__name__
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                self._removed(event.block_hashes, getattr(event, "medium", None))
            elif kind == "AllBlocksCleared":
                self.reset()

    def reset(self) -> None:
        """Every known block is gone (vLLM cleared its cache, or events were lost)."""
        by_tier: dict[str, list[int]] = {}
        for dyn_hash, _salt, tier in self.map.blocks.values():
            by_tier.setdefault(tier, []).append(dyn_hash)
        self.map.blocks.clear()
        for tier, hashes in by_tier.items():
            self.stats.removed_blocks += len(hashes)
            self.listener(KvEvent("removed", hashes, None, tier=tier))  # type: ignore[arg-type]

    def _stored(self, event: Any) -> None:
        tier = _MEDIUM_TIER.get(getattr(event, "medium", None), "device")
        parent_vllm = event.parent_block_hash
        if parent_vllm is None:
            parent, salt = None, _salt_of(getattr(event, "extra_keys", None))
        elif parent_vllm in self.map.blocks:
            parent, salt, _ = self.map.blocks[parent_vllm]
        else:
            self.stats.unknown_parents += len(event.block_hashes)
            return
        size = event.block_size or self.block_size
        hashes = hash_blocks(list(event.token_ids), size, salt, parent=parent)
        if len(hashes) != len(event.block_hashes):
            log.warning("vLLM BlockStored with %d hashes but %d full blocks of tokens; skipped",
                        len(event.block_hashes), len(hashes))
            return
        for vllm_hash, dyn_hash in zip(event.block_hashes, hashes):
            self.map.blocks[vllm_hash] = (dyn_hash, salt, tier)
        self.stats.stored_blocks += len(hashes)
        self.listener(KvEvent("stored", hashes, parent, tier=tier))  # type: ignore[arg-type]

    def _removed(self, vllm_hashes: list[Any], medium: str | None) -> None:
        gone = [self.map.blocks.pop(h) for h in vllm_hashes if h in self.map.blocks]
        by_tier: dict[str, list[int]] = {}
        for dyn_hash, _salt, tier in gone:
            by_tier.setdefault(tier, []).append(dyn_hash)
        for tier, hashes in by_tier.items():
            self.stats.removed_blocks += len(hashes)
            self.listener(KvEvent("removed", hashes, None, tier=tier))  # type: ignore[arg-type]

    def _fill_gap(self, upto: int) -> None:
        """Ask vLLM's replay buffer for the batches after last_seq; reset when it cannot give them."""
        wanted = self.last_seq + 1
        if self.replay_endpoint is not None:
            replay = self._ctx.socket(zmq.DEALER)
            replay.connect(self.replay_endpoint)
            try:
                replay.send_multipart([b"", wanted.to_bytes(8, "big")])
                first = None
                while replay.poll(2000):
                    frames = replay.recv_multipart()
                    if len(frames) < 4 or frames[2] == _END_SEQ or frames[1] == b"":
                        break
                    seq = int.from_bytes(frames[2], "big")
                    first = seq if first is None else first
                    if first != wanted:
                        break
                    if seq > self.last_seq and seq < upto:
                        self.stats.replayed_batches += 1
                        self.apply(seq, self._decoder.decode(frames[3]))
            finally:
                replay.close(linger=0)
            if self.last_seq == upto - 1:
                return
        log.warning("vLLM KV events %d..%d lost and not replayable: index entries of this worker reset",
                    wanted, upto - 1)
        self.stats.resets += 1
        self.reset()
        self.last_seq = upto - 1


def _salt_of(extra_keys: Any) -> int:
    """dyn's salt from the first block's extra keys (cache_salt "dyn-salt-N"); 0 when unsalted."""
    if not extra_keys:
        return 0
    first = extra_keys[0] or ()
    for key in first:
        if isinstance(key, str) and key.startswith(SALT_PREFIX):
            try:
                return int(key[len(SALT_PREFIX):])
            except ValueError:
                return 0
    return 0
