"""vLLM's KV events (real vLLM event types) -> dyn's chained block hashes, removals, clears, gaps."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch  # noqa: E402

from dyn.kv.hashing import hash_blocks  # noqa: E402
from dyn.worker.vllm_kv_bridge import VllmKvBridge  # noqa: E402

BS = 4
TOKENS = list(range(100, 116))  # four full blocks


def _stored(hashes, parent, tokens, extra_keys=None):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS,
                       lora_id=None, medium="GPU", lora_name=None, extra_keys=extra_keys)


def _bridge():
    events = []
    return VllmKvBridge("ipc://unused", None, BS, events.append), events


def _batch(*events):
    return KVEventBatch(ts=0.0, events=list(events))


def test_stored_blocks_get_the_routers_chained_hashes_across_events():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"v0", b"v1"], None, TOKENS[:8])))
    bridge.apply(1, _batch(_stored([b"v2", b"v3"], b"v1", TOKENS[8:16])))
    want = hash_blocks(TOKENS, BS)
    assert [e.kind for e in events] == ["stored", "stored"]
    assert events[0].block_hashes + events[1].block_hashes == want
    assert events[0].parent_hash is None and events[1].parent_hash == want[1]


def test_removal_maps_through_the_table_and_unknown_hashes_are_ignored():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"v0", b"v1", b"v2"], None, TOKENS[:12])))
    bridge.apply(1, _batch(BlockRemoved(block_hashes=[b"v2", b"nope"], medium="GPU")))
    want = hash_blocks(TOKENS[:12], BS)
    assert events[-1].kind == "removed" and events[-1].block_hashes == [want[2]]
    assert b"v2" not in bridge.map.blocks and bridge.stats.removed_blocks == 1


def test_a_child_of_an_unknown_parent_is_skipped_not_guessed():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"v5"], b"never-seen", TOKENS[:4])))
    assert events == [] and bridge.stats.unknown_parents == 1


def test_salted_chains_hash_with_the_tenant_salt_from_cache_salt():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"s0", b"s1"], None, TOKENS[:8], extra_keys=[("dyn-salt-77",), None])))
    assert events[0].block_hashes == hash_blocks(TOKENS[:8], BS, salt=77)
    bridge.apply(1, _batch(_stored([b"s2"], b"s1", TOKENS[8:12])))
    assert events[1].block_hashes == hash_blocks(TOKENS[:12], BS, salt=77)[2:]
    # a LoRA adapter's request: vLLM puts the adapter's name before the salt, on every block
    bridge.apply(2, _batch(_stored([b"l0", b"l1"], None, TOKENS[:8],
                                   extra_keys=[("sql-lora", "dyn-salt-91"), ("sql-lora",)])))
    assert events[2].block_hashes == hash_blocks(TOKENS[:8], BS, salt=91)


def test_all_blocks_cleared_removes_everything_known():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"v0", b"v1"], None, TOKENS[:8])))
    bridge.apply(1, _batch(AllBlocksCleared()))
    assert events[-1].kind == "removed" and sorted(events[-1].block_hashes) == sorted(hash_blocks(TOKENS[:8], BS))
    assert not bridge.map.blocks


def test_a_gap_that_cannot_be_replayed_resets_this_workers_entries():
    bridge, events = _bridge()
    bridge.apply(0, _batch(_stored([b"v0"], None, TOKENS[:4])))
    bridge._fill_gap(5)  # batches 1..4 lost, no replay endpoint
    assert bridge.stats.resets == 1 and bridge.last_seq == 4
    assert events[-1].kind == "removed" and events[-1].block_hashes == hash_blocks(TOKENS[:4], BS)
