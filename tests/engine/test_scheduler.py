"""Scheduling decisions on pure data: chunking, budgets, batch size, priority, preemption."""

from dyn.engine.backend import EngineRequest, SamplingParams
from dyn.engine.block_manager import BlockManager
from dyn.engine.scheduler import Scheduler
from dyn.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=16, batch=8, budget=64, **kw):
    return Scheduler(BlockManager(num_blocks, BS), max_batch_size=batch,
                     max_num_batched_tokens=budget, **kw)


_arrivals = iter(range(1, 10**6))


def seq(rid, n_prompt, priority=0, start=0):
    req = EngineRequest(rid, list(range(start + 1, start + n_prompt + 1)),
                        SamplingParams(max_tokens=100), priority=priority)
    return Sequence.from_request(req, next(_arrivals), BS)


def run(sched, batch, token=7):
    """Pretend the runner ran `batch`: advance and append a token where sampled."""
    for s, num, sample in batch:
        sched.advance(s, num)
        if sample:
            s.append_token(token, BS)


def plan(batch):
    return [(s.request_id, num, sample) for s, num, sample in batch]


def test_chunked_prefill_under_token_budget():
    sched = make(budget=8)
    a = seq("a", 20)
    sched.add(a)
    chunks = []
    while not chunks or not chunks[-1][2]:
        batch = sched.schedule()
        chunks.append(plan(batch)[0])
        run(sched, batch)
    assert chunks == [("a", 8, False), ("a", 8, False), ("a", 4, True)]
    assert a.block_ids == [0, 1, 2, 3, 4] and a.num_computed == 20


def test_decodes_keep_their_token_while_a_prefill_is_chunked():
    sched = make(budget=8)
    c = seq("c", 3)
    sched.add(c)
    run(sched, sched.schedule())  # c is now decoding
    sched.add(seq("b", 30, priority=1, start=100))  # b goes first, but leaves c its token
    assert plan(sched.schedule()) == [("b", 7, False), ("c", 1, True)]


def test_max_batch_size_limits_running():
    sched = make(batch=2)
    for rid in "abc":
        sched.add(seq(rid, 3, start=ord(rid) * 10))
    batch = sched.schedule()
    assert [s.request_id for s, _, _ in batch] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_priority_orders_admission():
    sched = make(batch=1)
    sched.add(seq("low", 3))
    sched.add(seq("high", 3, priority=5, start=50))
    assert plan(sched.schedule()) == [("high", 3, True)]


def test_prefix_hit_skips_cached_blocks():
    sched = make()
    a = seq("a", 10)
    sched.add(a)
    run(sched, sched.schedule())
    sched.remove(a)
    b = seq("b", 12)  # same first 10 tokens, then two more
    sched.add(b)
    batch = sched.schedule()
    # blocks of [1..4], [5..8] are cached; b computes tokens 8..11 only
    assert plan(batch) == [("b", 4, True)]
    assert b.block_ids[:2] == [0, 1] and b.num_cached_tokens == 8
    assert (sched.prefix_hit_blocks, sched.prefix_lookup_blocks) == (2, 2 + 2)


def test_full_hit_still_computes_the_last_token():
    sched = make()
    a = seq("a", 8)
    sched.add(a)
    run(sched, sched.schedule())
    sched.remove(a)
    b = seq("b", 8)
    sched.add(b)
    # only (8 - 1) // 4 = 1 block may hit: the last block is recomputed to sample
    assert plan(sched.schedule()) == [("b", 4, True)]
    assert b.num_cached_tokens == 4


def test_pool_pressure_preempts_the_latest_lowest_priority_running():
    sched = make(num_blocks=4, budget=64)
    a, b = seq("a", 7), seq("b", 7, start=100)  # 2 blocks each: pool full
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    assert sched.blocks.num_free_blocks == 0
    batch = sched.schedule()  # a's 8th token needs no new block; b's neither
    run(sched, batch)
    batch = sched.schedule()  # both cross into a third block: b (later) is preempted
    assert plan(batch) == [("a", 1, True)]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.block_ids == []
    assert sched.num_preemptions == 1


def test_higher_priority_waiting_preempts_lower_running():
    sched = make(num_blocks=2)
    low = seq("low", 7)
    sched.add(low)
    run(sched, sched.schedule())
    sched.add(seq("high", 5, priority=1, start=100))
    batch = sched.schedule()
    assert [r for r, _, _ in plan(batch)] == ["high"]
    assert low.status is SequenceStatus.WAITING and sched.num_preemptions == 1


def test_equal_priority_waiting_does_not_preempt():
    sched = make(num_blocks=2)
    first = seq("first", 7)
    sched.add(first)
    run(sched, sched.schedule())
    sched.add(seq("second", 5, start=100))
    assert plan(sched.schedule()) == [("first", 1, True)]
    assert sched.num_preemptions == 0


def test_lower_tier_blocks_are_fetched_not_recomputed():
    fetched = []
    tier: set[int] = set()

    def probe(hashes):
        n = 0
        for h in hashes:
            if h not in tier:
                break
            n += 1
        return n

    def fetch(hashes, ids):
        fetched.extend(zip(hashes, ids))
        return len(hashes)

    sched = make(tier_probe=probe, tier_fetch=fetch)
    s = seq("a", 13)
    tier.update(s.block_hashes[:2])
    sched.add(s)
    assert plan(sched.schedule()) == [("a", 5, True)]
    assert fetched == list(zip(s.block_hashes[:2], [0, 1]))
    assert sched.num_tier_hit_blocks == 2 and sched.blocks.match_prefix(s.block_hashes) == [0, 1]


def _twin_runs(num_blocks: int, fast: bool) -> list:
    """Four sequences decoding across block boundaries in a pool that runs out; every step's
    plan, block ids and preemptions, with the all-decode shortcut on or off."""
    sched = make(num_blocks=num_blocks, batch=8, budget=64)
    if not fast:
        sched._schedule_decodes = lambda: None  # type: ignore[method-assign]
    seqs = [seq(f"s{i}", 5 + i, priority=i % 2, start=10 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    trace = []
    for _ in range(30):
        batch = sched.schedule()
        trace.append((plan(batch), [list(s.block_ids) for s in seqs], sched.num_preemptions))
        run(sched, batch)
    return trace


def test_the_all_decode_shortcut_plans_exactly_as_the_general_pass():
    for num_blocks in (64, 12, 9):  # room to spare, then pools where decodes must preempt
        assert _twin_runs(num_blocks, fast=True) == _twin_runs(num_blocks, fast=False)
    assert _twin_runs(9, fast=False)[-1][2] > 0  # the small pool did preempt


def test_admission_that_preempts_the_holder_of_its_prefix_counts_the_freed_hits():
    # Preempting `low` frees the two prefix blocks `high` is about to lock: they joined the free
    # count, and locking takes them out of it again, so they cannot also pay for high's new blocks.
    sched = make(num_blocks=6)
    keeper, low = seq("keeper", 7, priority=1, start=100), seq("low", 11)
    sched.add(keeper)
    sched.add(low)
    run(sched, sched.schedule())  # keeper 2 blocks, low 3 (its first 2 cached): 1 free
    high = seq("high", 20, priority=1)  # shares low's first 8 tokens: 2 hits + 3 new blocks
    sched.add(high)
    batch = sched.schedule()  # before the fix: AssertionError "allocate(3) with 2 free"
    assert plan(batch) == [("keeper", 1, True)]
    assert high.status is SequenceStatus.WAITING and low.status is SequenceStatus.WAITING
    assert sched.blocks.num_free_blocks == 4
    run(sched, batch)
    sched.remove(keeper)  # now high fits: its 2 hits and 3 new blocks of 6
    batch = sched.schedule()
    assert plan(batch)[0] == ("high", 12, True) and high.num_cached_tokens == 8


def imported(sched, rid, n_prompt, start):
    """A sequence as Engine.commit_import leaves it: prompt blocks held and computed, first token in."""
    s = seq(rid, n_prompt, start=start)
    s.block_ids = sched.blocks.allocate(n_prompt // BS)
    s.num_computed = n_prompt
    s.append_token(7, BS)
    sched.register_computed(s)
    sched.add(s)
    return s


def test_imports_waiting_for_a_block_take_it_from_later_imports_instead_of_stalling():
    # Each import holds 3 of the 6 blocks and needs a 4th for its first decode: before, neither
    # could start and the engine stalled for good. The later one gives its blocks up (recompute).
    sched = make(num_blocks=6)
    first, second = imported(sched, "first", 12, 0), imported(sched, "second", 12, 100)
    assert sched.blocks.num_free_blocks == 0
    batch = sched.schedule()
    assert plan(batch) == [("first", 1, True)]
    assert second.status is SequenceStatus.WAITING and second.block_ids == [] and second.num_computed == 0
    assert sched.num_preemptions == 1
    run(sched, batch)
    sched.remove(first)
    # its prompt blocks stayed cached, but for the last, evicted for first's new block
    assert plan(sched.schedule()) == [("second", 5, True)] and second.num_cached_tokens == 8
