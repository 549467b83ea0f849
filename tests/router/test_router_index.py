"""KvIndex and KvEventTracker against a brute-force model (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_brute import BruteCaches

from dyn.kv.events import KvEvent
from dyn.router import KvEventBatch, KvEventError, KvEventTracker, KvIndex, KvSnapshot

TIERS = ("device", "host", "disk")
CHAINS = [[c * 100 + i for i in range(5)] for c in range(3)]
ALL_HASHES = [h for chain in CHAINS for h in chain]
QUERIES = [chain[:n] for chain in CHAINS for n in (2, 3, 5)] + [[h] for h in ALL_HASHES] + [
    [0, 1, 102, 103], [200, 201, 2, 3], [7, 0, 1]]

hashes_st = st.one_of(
    st.builds(lambda c, n: CHAINS[c][:n], st.integers(0, 2), st.integers(1, 5)),
    st.builds(lambda c, s, n: CHAINS[c][s:s + n], st.integers(0, 2), st.integers(0, 4), st.integers(1, 5)),
    st.lists(st.sampled_from([h for chain in CHAINS for h in chain]), min_size=1, max_size=5))


def assert_matches(index: KvIndex, brute: BruteCaches, workers: list[str]) -> None:
    for w in workers:
        expected = brute.held.get(w, {t: set() for t in TIERS})
        assert {t: set(s) for t, s in index.blocks_of(w).items()} == expected, w
    for query in QUERIES:
        found = index.find(query)
        for w in workers:
            n, device, host, disk = brute.overlap(w, query)
            assert found.blocks.get(w, 0) == n, (w, query)
            if n:
                assert found.tier_hits(w) == (device, host, disk), (w, query)


# ---- the index alone: many workers, bit reuse ------------------------------

worker_st = st.one_of(st.integers(0, 1), st.integers(0, 69))  # mostly a few, sometimes many
index_op = st.one_of(
    st.tuples(st.just("store"), worker_st, st.sampled_from(TIERS), hashes_st),
    st.tuples(st.just("remove"), worker_st, st.sampled_from(TIERS), hashes_st),
    st.tuples(st.just("remove_worker"), worker_st, st.just(""), st.just([])),
    st.tuples(st.just("replace"), worker_st, st.sampled_from(TIERS), hashes_st),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(index_op, min_size=20, max_size=80))
def test_index_equals_brute_force(ops):
    index, brute = KvIndex(), BruteCaches()
    workers = [f"w{i}" for i in range(70)]
    touched: set[str] = set()
    for op, w_idx, tier, hashes in ops:
        w = workers[w_idx]
        touched.add(w)
        if op == "store":
            index.store(w, tier, hashes)
            brute.store(w, tier, hashes)
        elif op == "remove":
            index.remove(w, tier, hashes)
            brute.remove(w, tier, hashes)
        elif op == "remove_worker":
            index.remove_worker(w)
            brute.clear(w)
        else:
            index.replace_worker(w, {tier: hashes})
            brute.clear(w)
            brute.store(w, tier, hashes)
        assert_matches(index, brute, sorted(touched))
    live = {h for w in brute.held.values() for s in w.values() for h in s}
    assert len(index) == len(live)


def test_find_stops_at_first_miss_and_reports_tiers():
    index = KvIndex()
    index.store("a", "device", [1, 2, 3])
    index.store("b", "device", [1])
    index.store("b", "host", [2])
    index.store("b", "disk", [3, 4])
    index.store("c", "device", [2, 3])  # no block 1: no prefix at all
    found = index.find([1, 2, 3, 4, 5])
    assert found.blocks == {"a": 3, "b": 4}
    assert found.tier_hits("b") == (1, 1, 2)
    assert found.tier_hits("a") == (3, 0, 0)
    assert index.holders(2) == {"b": "host", "c": "device", "a": "device"}


def test_block_in_two_tiers_counts_as_device_and_survives_partial_removal():
    index = KvIndex()
    index.store("a", "device", [1, 2])
    index.store("a", "host", [2])
    assert index.find([1, 2]).tier_hits("a") == (2, 0, 0)
    index.remove("a", "device", [2])
    assert index.find([1, 2]).tier_hits("a") == (1, 1, 0)
    index.remove("a", "host", [2])
    assert index.find([1, 2]).blocks == {"a": 1}


def test_removed_worker_bit_is_reused_without_leaking_blocks():
    index = KvIndex()
    index.store("a", "device", [1, 2])
    index.remove_worker("a")
    index.store("b", "device", [1])
    assert index.find([1, 2]).blocks == {"b": 1}
    assert index.num_blocks("a") == {"device": 0, "host": 0, "disk": 0}


# ---- sequence numbers, restarts, lost events, snapshots --------------------

@dataclass
class WorkerModel:
    epoch: int = 1
    next_seq: int = 0
    view_epoch: int | None = None
    """Epoch the index last heard about (None: nothing yet)."""
    max_delivered: int = -1
    max_lost: int = -1
    pending_snapshot: KvSnapshot | None = None


event_st = st.tuples(st.sampled_from(["stored", "stored", "removed"]), st.sampled_from(TIERS), hashes_st)
stream_worker_st = st.one_of(st.just(0), st.integers(0, 3))
stream_op = st.one_of(
    st.tuples(st.just("publish"), stream_worker_st, st.lists(event_st, min_size=0, max_size=3),
              st.booleans()),
    st.tuples(st.just("restart"), stream_worker_st, st.just([]), st.just(False)),
    st.tuples(st.just("die"), stream_worker_st, st.just([]), st.just(False)),
    st.tuples(st.just("take_snapshot"), stream_worker_st, st.just([]), st.just(False)),
    st.tuples(st.just("deliver_snapshot"), stream_worker_st, st.just([]), st.just(False)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(stream_op, min_size=20, max_size=80))
def test_event_stream_with_losses_restarts_and_snapshots(ops):
    index, brute = KvIndex(), BruteCaches()
    tracker = KvEventTracker(index)
    workers = [f"w{i}" for i in range(4)]
    models = {w: WorkerModel() for w in workers}

    def in_sync(w: str) -> bool:
        m = models[w]
        if m.view_epoch is None:
            return not brute.held.get(w) or not any(brute.held[w].values())
        return (m.view_epoch == m.epoch and m.max_lost <= m.max_delivered
                and not tracker.needs_snapshot(w))

    def publish(w: str, events: list, lost: bool) -> None:
        m = models[w]
        for kind, tier, hashes in events:
            (brute.store if kind == "stored" else brute.remove)(w, tier, hashes)
        batch = KvEventBatch(w, m.next_seq, [KvEvent(k, list(h), None, t) for k, t, h in events],
                             epoch=m.epoch)
        m.next_seq += 1
        if lost:
            m.max_lost = batch.seq
            return
        tracker.apply_batch(batch)
        m.view_epoch, m.max_delivered = m.epoch, batch.seq

    def deliver(w: str, snap: KvSnapshot) -> None:
        m = models[w]
        if tracker.apply_snapshot(snap) and snap.epoch == m.epoch:
            m.view_epoch = m.epoch
            m.max_delivered = max(m.max_delivered, snap.seq)

    for op, w_idx, events, lost in ops:
        w = workers[w_idx]
        m = models[w]
        if op == "publish":
            publish(w, events, lost)
        elif op == "restart":
            brute.clear(w)
            m.epoch, m.next_seq, m.max_lost, m.max_delivered = m.epoch + 1, 0, -1, -1
            m.pending_snapshot = None
        elif op == "die":
            brute.clear(w)
            tracker.remove_worker(w)
            models[w] = WorkerModel(epoch=m.epoch + 1)
        elif op == "take_snapshot":
            m.pending_snapshot = KvSnapshot(w, m.next_seq - 1, brute.snapshot(w), epoch=m.epoch)
        elif m.pending_snapshot is not None:
            deliver(w, m.pending_snapshot)
            m.pending_snapshot = None
        assert_matches(index, brute, [x for x in workers if in_sync(x)])

    # Quiesce: a heartbeat batch reveals losses; snapshots repair them.
    for w in workers:
        m = models[w]
        if m.view_epoch is None and not brute.held.get(w):
            continue
        publish(w, [], lost=False)
        if tracker.needs_snapshot(w):
            deliver(w, KvSnapshot(w, m.next_seq - 1, brute.snapshot(w), epoch=m.epoch))
        assert in_sync(w)
    assert_matches(index, brute, workers)


def test_gap_buffers_and_snapshot_replays_newer_batches():
    index = KvIndex()
    tracker = KvEventTracker(index)
    stored = lambda *h: KvEvent("stored", list(h))  # noqa: E731
    assert not tracker.apply_batch(KvEventBatch("w", 0, [stored(1)])).needs_snapshot
    # seq 1 (stored 2) is lost
    result = tracker.apply_batch(KvEventBatch("w", 2, [stored(3)]))
    assert (result.status, result.needs_snapshot) == ("gap", True)
    tracker.apply_batch(KvEventBatch("w", 3, [KvEvent("removed", [1])]))
    # The snapshot was taken after seq 2: it holds 1, 2, 3; seq 3 must be replayed on top.
    assert tracker.apply_snapshot(KvSnapshot("w", 2, {"device": [1, 2, 3]}))
    assert not tracker.needs_snapshot("w")
    assert index.blocks_of("w")["device"] == {2, 3}
    assert tracker.apply_batch(KvEventBatch("w", 3, [stored(9)])).status == "duplicate"


def test_snapshot_older_than_unbuffered_batches_is_refused():
    tracker = KvEventTracker(KvIndex())
    tracker.apply_batch(KvEventBatch("w", 0, [KvEvent("stored", [1])]))
    tracker.apply_batch(KvEventBatch("w", 1, [KvEvent("stored", [2])]))
    assert not tracker.apply_snapshot(KvSnapshot("w", 0, {"device": [1]}))
    assert tracker.index.blocks_of("w")["device"] == {1, 2}


def test_new_epoch_drops_old_contents():
    tracker = KvEventTracker(KvIndex())
    tracker.apply_batch(KvEventBatch("w", 0, [KvEvent("stored", [1, 2])], epoch=5))
    result = tracker.apply_batch(KvEventBatch("w", 0, [KvEvent("stored", [7])], epoch=6))
    assert (result.status, result.needs_snapshot) == ("restart", False)
    assert tracker.index.find([1]).blocks == {}
    assert tracker.index.find([7]).blocks == {"w": 1}
    stale = tracker.apply_batch(KvEventBatch("w", 3, [KvEvent("stored", [1])], epoch=5))
    assert stale.status == "duplicate"
    assert tracker.index.find([1]).blocks == {}


@pytest.mark.parametrize("event, field", [
    (KvEvent("stored", [1], tier="gpu"), "tier"),  # type: ignore[arg-type]
    (KvEvent("evicted", [1]), "kind"),  # type: ignore[arg-type]
    (KvEvent("stored", [1, "x"]), "block_hashes"),  # type: ignore[list-item]
])
def test_malformed_batch_is_rejected_whole_with_location(event, field):
    tracker = KvEventTracker(KvIndex())
    with pytest.raises(KvEventError) as err:
        tracker.apply_batch(KvEventBatch("w7", 4, [KvEvent("stored", [5]), event]))
    assert err.value.field == field and err.value.event_idx == 1
    assert "w7" in str(err.value) and "seq 4" in str(err.value) and "#1" in str(err.value)
    assert tracker.index.find([5]).blocks == {}
