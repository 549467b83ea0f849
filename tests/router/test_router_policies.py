"""Each policy's choice on constructed states, and the Router around them."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import pytest

from dyn.config.recipe import RouterSpec
from dyn.kv.events import KvEvent
from dyn.router import (KvEventBatch, KvSnapshot, NoWorkerError, RouteHints, RouteInputError,
                        RouteRequest, Router, WorkerLoad)

BS = 16
PROMPT = list(range(1000, 1010))  # 10 blocks


KNOWN = ("a", "b", "c", "d", "p0", "p1", "d1", "d2")


def router(policy: str = "kv", **spec) -> Router:
    """A router whose workers all publish KV events (so nothing is predicted)."""
    r = Router(RouterSpec(**{"prefill_weight": 1.0, **spec}), BS, policy=policy, seed=7)
    for worker in KNOWN:
        r.apply_events(KvEventBatch(worker, 0, []))
    return r


def publish(r: Router, worker: str, hashes: list[int], tier: str = "device") -> None:
    seq = r.events.expected_seq(worker) or 0
    event = KvEvent("stored", hashes, None, tier)  # type: ignore[arg-type]
    assert r.apply_events(KvEventBatch(worker, seq, [event])).status == "applied"


def request(hashes=PROMPT, tokens: int | None = None, **hints) -> RouteRequest:
    return RouteRequest(hashes, tokens if tokens is not None else len(hashes) * BS, RouteHints(**hints))


IDLE = [WorkerLoad("a"), WorkerLoad("b"), WorkerLoad("c")]


@pytest.mark.parametrize("policy", ["kv", "dynamo", "sglang", "llm-d"])
def test_prefix_goes_to_its_holder(policy):
    r = router(policy)
    publish(r, "b", PROMPT[:8])
    publish(r, "c", PROMPT[:2])
    for _ in range(5):
        decision = r.choose(request(), IDLE, now=0.0)
        assert decision.worker_id == "b"
        assert decision.overlap_blocks == 8 and decision.tier_hits == (8, 0, 0)


def test_kv_cost_numbers_and_tier_credit():
    r = router(host_hit_credit=0.75, disk_hit_credit=0.25)
    publish(r, "a", PROMPT[:8], tier="host")
    publish(r, "b", PROMPT[:8], tier="disk")
    loads = [WorkerLoad("a"), WorkerLoad("b"), WorkerLoad("c", waiting_prefill_tokens=0)]
    decision = r.choose(request(), loads, now=0.0)
    # a: 2 uncached + 8 * 0.25 = 4; b: 2 + 8 * 0.75 = 8; c: 10
    assert decision.scores == {"a": 4.0, "b": 8.0, "c": 10.0}
    assert decision.worker_id == "a" and decision.tier_hits == (0, 8, 0)


def test_queued_work_outweighs_a_cache_hit():
    r = router()
    publish(r, "a", PROMPT[:8])
    loads = [WorkerLoad("a", waiting_prefill_tokens=40 * BS), WorkerLoad("b")]
    assert r.choose(request(), loads, now=0.0).worker_id == "b"


def test_skewed_prefix_still_spreads_when_holder_is_overloaded():
    """Every request shares one hot prefix; load reports make the router spread it."""
    r = router()
    publish(r, "a", PROMPT)
    loads = {w: WorkerLoad(w) for w in "abcd"}
    chosen = Counter()
    for i in range(40):
        decision = r.choose(request(PROMPT + [5000 + i]), list(loads.values()), now=float(i))
        chosen[decision.worker_id] += 1
        w = loads[decision.worker_id]
        # The chosen worker reports the work it now has (1 new block prefilled + decoding).
        loads[w.worker_id] = replace(w, waiting_prefill_tokens=w.waiting_prefill_tokens + BS,
                                     active_decode_blocks=w.active_decode_blocks + 11)
    assert len(chosen) == 4 and max(chosen.values()) < 40 * 0.6


def test_ties_between_idle_workers_are_spread():
    r = router()
    chosen = Counter(r.choose(request([7]), IDLE, now=0.0).worker_id for _ in range(60))
    assert set(chosen) == {"a", "b", "c"}


def test_session_affinity_keeps_worker_while_not_much_worse():
    r = router(session_affinity_slack=0.2)
    first = r.choose(request(session_id="s1"), IDLE, now=0.0)
    loads = [replace(w, waiting_prefill_tokens=BS if w.worker_id == first.worker_id else 0) for w in IDLE]
    again = r.choose(request([1, 2, 3], session_id="s1"), loads, now=1.0)
    assert (again.worker_id, again.reason) == (first.worker_id, "session affinity")
    # Much worse now: the session moves.
    loads = [replace(w, waiting_prefill_tokens=100 * BS if w.worker_id == first.worker_id else 0)
             for w in IDLE]
    moved = r.choose(request([4, 5], session_id="s1"), loads, now=2.0)
    assert moved.worker_id != first.worker_id and "too loaded" in moved.reason


def test_session_expires_after_ttl():
    r = Router(RouterSpec(), BS, seed=3, session_ttl_s=10.0)
    first = r.choose(request(session_id="s"), IDLE, now=0.0)
    assert r._session_worker("s", now=5.0) == first.worker_id
    assert r._session_worker("s", now=20.0) is None


def test_latency_sensitive_prefers_idle_worker():
    r = router()
    publish(r, "a", PROMPT[:8])
    loads = [WorkerLoad("a", waiting_prefill_tokens=6 * BS, num_waiting=2), WorkerLoad("b")]
    assert r.choose(request(), loads, now=0.0).worker_id == "a"  # 2 + 6 < 10
    assert r.choose(request(latency_sensitive=True), loads, now=0.0).worker_id == "b"
    assert r.choose(request(priority=3), loads, now=0.0).worker_id == "b"


def test_expected_output_tokens_count_toward_decode_load():
    r = router()
    publish(r, "a", PROMPT[:8])
    loads = [WorkerLoad("a", active_decode_blocks=5), WorkerLoad("b")]
    # a: 2 uncached + 5 decode blocks, weighted by 1 + E / (E + 160); b: 10 uncached.
    short = r.choose(request(expected_output_tokens=1), loads, now=0.0)
    long = r.choose(request(expected_output_tokens=4000), loads, now=0.0)
    assert short.worker_id == "a" and short.scores["a"] == pytest.approx(2 + 5 * (1 + 1 / 161))
    assert long.worker_id == "b" and long.scores["a"] == pytest.approx(2 + 5 * (1 + 4000 / 4160))
    # Memory pressure: the output would not fit in a's free pool.
    loads = [WorkerLoad("a", num_kv_blocks=100, kv_usage=0.95), WorkerLoad("b", num_kv_blocks=100)]
    publish(r, "a", PROMPT)
    assert r.choose(request(expected_output_tokens=16), loads, now=0.0).worker_id == "a"
    assert r.choose(request(expected_output_tokens=20 * BS), loads, now=0.0).worker_id == "b"


def test_sglang_switches_to_least_loaded_when_imbalanced():
    r = router("sglang")
    publish(r, "a", PROMPT)
    balanced = [WorkerLoad("a", num_running=30), WorkerLoad("b", num_running=10)]
    assert r.choose(request(), balanced, now=0.0).worker_id == "a"
    skewed = [WorkerLoad("a", num_running=100), WorkerLoad("b", num_running=10)]
    decision = r.choose(request(), skewed, now=0.0)
    assert decision.worker_id == "b" and "imbalanced" in decision.reason


def test_sglang_low_match_goes_to_smallest_cache():
    r = router("sglang")
    publish(r, "a", [1, 2, 3, 4])
    publish(r, "b", [9])
    decision = r.choose(request([1] + [50, 51, 52, 53]), [WorkerLoad("a"), WorkerLoad("b")], now=0.0)
    assert decision.worker_id == "b" and "smallest cache" in decision.reason


def test_llmd_weights_prefix_queue_and_kv():
    r = router("llm-d")
    publish(r, "a", PROMPT[:5])
    loads = [WorkerLoad("a", num_waiting=10, kv_usage=0.9), WorkerLoad("b", num_waiting=0, kv_usage=0.1)]
    decision = r.choose(request(), loads, now=0.0)
    # a: 3*0.5 + 2*0 + 2*0.1 = 1.7; b: 0 + 2*1 + 2*0.9 = 3.8
    assert decision.worker_id == "b"
    assert decision.scores == pytest.approx({"a": 1.7, "b": 3.8})


def test_round_robin_least_loaded_random():
    rr = router("round-robin")
    assert [rr.choose(request(), IDLE, now=0.0).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    ll = router("least-loaded")
    loads = [WorkerLoad("a", num_running=3), WorkerLoad("b", num_running=1), WorkerLoad("c", num_running=2)]
    assert ll.choose(request(), loads, now=0.0).worker_id == "b"
    rnd = router("random")
    assert {rnd.choose(request(), IDLE, now=0.0).worker_id for _ in range(40)} == {"a", "b", "c"}


def test_softmax_temperature_spreads_near_ties_but_keeps_the_favourite():
    r = router(temperature=0.5)
    publish(r, "a", PROMPT[:9])
    publish(r, "b", PROMPT[:8])
    chosen = Counter(r.choose(request(), [WorkerLoad("a"), WorkerLoad("b"), WorkerLoad("c")],
                              now=0.0).worker_id for _ in range(300))
    assert chosen["a"] > chosen["b"] > chosen["c"] > 0


def test_unhealthy_full_and_wrong_role_workers_are_skipped_with_reasons():
    r = router()
    publish(r, "a", PROMPT)
    loads = [WorkerLoad("a", healthy=False), WorkerLoad("b", num_waiting=4, max_queue=4),
             WorkerLoad("c", role="prefill"), WorkerLoad("d", role="decode")]
    assert r.choose(request(), loads, now=0.0, role="decode").worker_id == "d"
    with pytest.raises(NoWorkerError) as err:
        r.choose(request(), loads[:3], now=0.0, role="decode")
    assert err.value.reasons == {"a": "unhealthy", "b": "queue full (4/4 waiting)",
                                 "c": "role prefill, need decode"}
    assert not err.value.all_full
    with pytest.raises(NoWorkerError) as err:
        r.choose(request(), [loads[1]], now=0.0)
    assert err.value.all_full


def test_bad_inputs_name_the_field():
    with pytest.raises(RouteInputError, match="kv_usage"):
        WorkerLoad("x", kv_usage=1.5)
    with pytest.raises(RouteInputError, match="waiting_prefill_tokens.*'x'"):
        WorkerLoad("x", waiting_prefill_tokens=-1)
    with pytest.raises(RouteInputError, match="num_tokens"):
        RouteRequest([1], -3)
    with pytest.raises(RouteInputError, match="router.policy.*least-loaded"):
        Router(RouterSpec(), BS, policy="fastest")  # type: ignore[arg-type]


def test_disaggregated_picks_prefill_and_decode_workers():
    r = router(disagg_threshold_tokens=64)
    publish(r, "d2", PROMPT[:9])
    publish(r, "p1", PROMPT[:5])
    prefill = [WorkerLoad("p0", role="prefill"), WorkerLoad("p1", role="prefill")]
    decode = [WorkerLoad("d1", role="decode"), WorkerLoad("d2", role="decode")]
    cached = r.choose_disagg(request(), prefill, decode, now=0.0)
    assert cached.decode.worker_id == "d2" and cached.prefill is None  # 16 uncached tokens <= 64
    fresh = r.choose_disagg(request(PROMPT[:5] + [77, 78, 79]), prefill, decode[:1], now=0.0)
    assert fresh.decode.worker_id == "d1"
    assert fresh.prefill is not None and fresh.prefill.worker_id == "p1"
    local = r.choose_disagg(request([5, 6, 7, 8, 9, 10]), [], decode, now=0.0)
    assert local.prefill is None


def test_without_events_the_first_choice_becomes_sticky_by_prediction():
    r = Router(RouterSpec(), BS, seed=5)
    chosen = {r.choose(request(), IDLE, now=float(t)).worker_id for t in range(10)}
    assert len(chosen) == 1


def test_prediction_fallback_without_events_expires_with_ttl():
    r = Router(RouterSpec(), BS, seed=1, prediction_ttl_s=30.0)
    first = r.choose(request(), IDLE, now=0.0)
    again = r.choose(request(PROMPT + [99]), IDLE, now=10.0)
    assert again.worker_id == first.worker_id and again.overlap_blocks == 10
    # Refreshed at t=10, so still predicted at t=35; gone after t=40 + ttl.
    assert r.find(PROMPT, now=35.0).blocks == {first.worker_id: 10}
    assert r.find(PROMPT, now=41.0).blocks == {}


def test_first_event_replaces_predictions_for_that_worker():
    r = Router(RouterSpec(), BS, seed=2)
    first = r.choose(request(), IDLE, now=0.0)
    r.apply_events(KvEventBatch(first.worker_id, 0, [KvEvent("stored", PROMPT[:3])]))
    assert r.find(PROMPT, now=1.0).blocks == {first.worker_id: 3}
    r.choose(request([42, 43]), IDLE, now=2.0)
    assert r.find([42], now=2.0).blocks.get(first.worker_id) is None


def test_worker_death_drops_blocks_and_sessions():
    r = router()
    publish(r, "a", PROMPT)
    r.choose(request(session_id="s"), [WorkerLoad("a")], now=0.0)
    r.remove_worker("a")
    assert r.find(PROMPT, now=0.0).blocks == {}
    assert r._session_worker("s", now=0.0) is None
    r.apply_snapshot(KvSnapshot("a", 3, {"device": PROMPT[:2]}, epoch=2))
    assert r.find(PROMPT, now=0.0).blocks == {"a": 2}


def test_decisions_are_logged_at_debug_with_scores(caplog):
    r = router()
    publish(r, "a", PROMPT)
    with caplog.at_level(logging.DEBUG, logger="dyn.router"):
        r.choose(request(), IDLE, now=0.0)
    assert "-> a" in caplog.text and "scores=" in caplog.text and "'b': 10.0" in caplog.text


def test_priority_breaks_cost_ties_toward_the_emptier_worker():
    r = router()
    busy = WorkerLoad("a", num_running=3)
    idle = WorkerLoad("b", num_running=0)
    high = Counter(r.choose(request(priority=5), [busy, idle], 0.0).worker_id for _ in range(20))
    low = Counter(r.choose(request(priority=0), [busy, idle], 0.0).worker_id for _ in range(40))
    assert high == {"b": 20}  # equal cost; the urgent request takes the one with less in it
    assert set(low) == {"a", "b"}  # the rest share ties at random


def test_session_ttl_from_the_hint_and_end_session():
    r = router(session_ttl_s=100.0)
    assert r.session_ttl_s == 100.0
    loads = [WorkerLoad("a"), WorkerLoad("b")]
    first = r.choose(request(session_id="s", session_ttl_s=5.0), loads, 0.0).worker_id
    assert r._session_worker("s", 4.0) == first and r._session_worker("s", 6.0) is None
    r.choose(request(session_id="t"), loads, 10.0)
    assert r.end_session("t") is not None and r._session_worker("t", 11.0) is None


def test_dynamo_baseline_counts_queued_prefill_like_dynamo():
    """Dynamo's logit: weight * (queued + uncached prefill tokens) / block size + decode blocks."""
    r = Router(RouterSpec(policy="dynamo", prefill_weight=2.0), BS, seed=0)
    publish(r, "a", PROMPT[:8])
    loads = [WorkerLoad("a", waiting_prefill_tokens=7 * BS, active_decode_blocks=3), WorkerLoad("b")]
    decision = r.choose(request(), loads, now=0.0)
    assert decision.scores == {"a": pytest.approx(2.0 * (2 + 7) + 3), "b": pytest.approx(2.0 * 10)}
    assert decision.worker_id == "b"  # 21 vs 20: the queue behind a's cache hit outweighs it
