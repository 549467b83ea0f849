"""Exact block ids and eviction order of the paged pool (cf. vLLM test_prefix_caching)."""

from dyn.engine.block_manager import BlockManager
from dyn.kv.events import KvEvent


def make(num_blocks=6):
    events: list[KvEvent] = []
    evicted: list[tuple[int, int, int | None]] = []
    bm = BlockManager(num_blocks, 4, on_evict=lambda *a: evicted.append(a),
                      on_event=events.append)
    return bm, events, evicted


def test_allocates_in_id_order_and_recycles_empty_blocks_fifo():
    bm, _, _ = make()
    assert bm.allocate(3) == [0, 1, 2]
    bm.free([0, 1])
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 1
    # untouched blocks first, then freed ones in freeing order (last-first: 1, 0)
    assert bm.allocate(5) == [3, 4, 5, 1, 0]
    assert bm.num_free_blocks == 0 and not bm.can_allocate(1)


def test_cached_blocks_survive_free_and_are_matched():
    bm, events, _ = make()
    ids = bm.allocate(3)
    assert bm.cache_blocks(ids[:2], [11, 12], None) == 2
    assert events == [KvEvent("stored", [11, 12], None)]
    bm.free(ids)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 6
    assert bm.match_prefix([11, 12, 13]) == [0, 1]
    assert bm.match_prefix([12]) == [1]  # a hash names its whole prefix
    assert bm.match_prefix([99, 11]) == []


def test_empty_blocks_are_used_before_evicting_cached_ones():
    bm, events, evicted = make()
    ids = bm.allocate(2)
    bm.cache_blocks(ids, [11, 12], None)
    bm.free(ids)
    assert bm.allocate(4) == [2, 3, 4, 5]
    assert evicted == [] and bm.num_cached_blocks == 2


def test_eviction_is_lru_and_tail_first():
    bm, events, evicted = make()
    a = bm.allocate(3)
    bm.cache_blocks(a, [11, 12, 13], None)
    b = bm.allocate(3)
    bm.cache_blocks(b, [21, 22, 23], None)
    bm.free(a)  # freed first: LRU order 2, 1, 0 (tail first)
    bm.free(b)  # then 5, 4, 3
    events.clear()
    assert bm.allocate(4) == [2, 1, 0, 5]
    assert [e[:2] for e in evicted] == [(2, 13), (1, 12), (0, 11), (5, 23)]
    assert evicted[0][2] == 12 and evicted[2][2] is None  # parent hashes go to the tier
    assert events == [KvEvent("removed", [13, 12, 11, 23])]
    assert bm.match_prefix([21, 22]) == [3, 4]
    assert bm.match_prefix([11]) == []


def test_lock_takes_a_hit_off_the_lru_and_touch_refreshes_it():
    bm, _, _ = make(4)
    ids = bm.allocate(2)
    bm.cache_blocks(ids, [11, 12], None)
    bm.free(ids)
    bm.lock([0])  # a new request hits block 0
    assert bm.ref_count(0) == 1 and bm.num_free_blocks == 3
    bm.allocate(2)  # empty blocks 2, 3
    assert bm.allocate(1) == [1]  # only block 1 is evictable
    bm.free([0])
    assert bm.match_prefix([11]) == [0]


def test_shared_block_stays_until_last_reference_drops():
    bm, _, _ = make(3)
    ids = bm.allocate(1)
    bm.cache_blocks(ids, [7], None)
    bm.lock(ids)
    assert bm.ref_count(0) == 2
    bm.free(ids)
    assert bm.num_free_blocks == 2
    bm.free(ids)
    assert bm.num_free_blocks == 3 and bm.match_prefix([7]) == [0]


def test_duplicate_hash_is_not_registered_and_splits_the_event():
    bm, events, _ = make()
    first = bm.allocate(1)
    bm.cache_blocks(first, [11], None)
    events.clear()
    dup = bm.allocate(3)  # a second sequence computed the same first block meanwhile
    assert bm.cache_blocks(dup, [11, 12, 13], None) == 2
    assert bm.block_hash(dup[0]) is None and bm.lookup(11) == first[0]
    assert events == [KvEvent("stored", [12, 13], 11)]
    bm.free(dup)  # the duplicate returns as an empty block
    assert bm.allocate(3) == [4, 5, 1]  # the uncached duplicate, before any cached block


def test_cache_blocks_continues_a_chain_with_parent():
    bm, events, _ = make()
    ids = bm.allocate(2)
    bm.cache_blocks(ids[:1], [11], None)
    bm.cache_blocks(ids[:2], [11, 12], 7)  # block 0 already registered: skipped
    assert events == [KvEvent("stored", [11], None), KvEvent("stored", [12], 11)]


def test_retention_keeps_high_priority_blocks_and_expiry_drops_them_with_an_event():
    from dyn.kv.retention import Retention

    now = [0.0]
    events, evicted = [], []
    bm = BlockManager(4, 4, on_evict=lambda *a: evicted.append(a), on_event=events.append,
                      clock=lambda: now[0])
    keep = bm.allocate(2)
    bm.cache_blocks(keep, [11, 12], None, Retention(priority=5, ttl_s=30))
    plain = bm.allocate(2)
    bm.cache_blocks(plain, [21, 22], None)
    bm.free(keep)
    bm.free(plain)  # plain blocks are more recent but lower priority
    events.clear()
    assert bm.allocate(2) == [3, 2]
    assert bm.match_prefix([11, 12]) == keep
    assert [e[4] for e in evicted] == [None, None]  # no retention TTL to carry down
    bm.free([3, 2])
    now[0] = 31
    assert bm.expire() == 2
    assert bm.match_prefix([11]) == [] and events[-1] == KvEvent("removed", [12, 11])
    assert bm.num_free_blocks == 4
