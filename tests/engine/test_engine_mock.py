"""The generic Engine over the MockRunner: caching, preemption, errors, disaggregation, tiers."""

from __future__ import annotations

import pytest

from dyn.config.recipe import MockTiming
from dyn.engine.backend import EngineRequest, SamplingParams
from dyn.engine.mock import MockEngine
from dyn.errors import RequestError
from dyn.kv.events import KvEvent, LowerTier
from dyn.kv.hashing import hash_blocks

BS = 16


def engine(**kw) -> MockEngine:
    kw.setdefault("num_blocks", 256)
    return MockEngine(block_size=BS, vocab_size=1000, max_context=512, clock="virtual", **kw)


def req(rid, prompt, max_tokens=8, **kw) -> EngineRequest:
    sampling = kw.pop("sampling", None) or SamplingParams(max_tokens=max_tokens)
    return EngineRequest(rid, list(prompt), sampling, **kw)


def drain(eng, max_steps=10_000):
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not eng.has_work():
            return tokens, reasons
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    raise AssertionError("engine did not drain")


def solo(prompt, max_tokens=8):
    eng = engine()
    eng.add_request(req("x", prompt, max_tokens))
    return drain(eng)[0]["x"]


PROMPT = [(7 * i) % 997 + 3 for i in range(200)]


def test_generates_deterministic_in_vocab_non_eos_tokens():
    out = solo(PROMPT, 20)
    assert len(out) == 20 and out == solo(PROMPT, 20)
    assert all(0 <= t < 1000 and t != 2 for t in out)
    assert solo(PROMPT[:-1] + [5], 20) != out


def test_second_request_sharing_90_percent_computes_only_new_tokens():
    eng = engine()
    eng.add_request(req("a", PROMPT, 1))
    drain(eng)
    before = eng.stats().num_computed_tokens
    second = PROMPT[:180] + [1] * 20
    eng.add_request(req("b", second, 1))
    outs = eng.step()
    # 180 shared tokens = 11 full blocks (176 tokens); only 24 tokens run
    assert eng.stats().num_computed_tokens - before == 24
    assert outs[0].num_cached_tokens == 176
    stats = eng.stats()
    assert stats.prefix_hit_blocks == 11 and stats.prefix_lookup_blocks == 12 + 12
    assert outs[0].token_ids == solo(second, 1)  # cached KV gives the same answer


def test_small_pool_preempts_and_still_finishes_with_same_output():
    prompts = {f"r{i}": [(i * 31 + j) % 900 + 5 for j in range(40)] for i in range(5)}
    expected = {rid: solo(p, 30) for rid, p in prompts.items()}
    eng = engine(num_blocks=12, max_num_batched_tokens=64)  # each needs 5 blocks; 25 > 12
    for rid, p in prompts.items():
        eng.add_request(req(rid, p, 30))
    tokens, reasons = drain(eng)
    assert tokens == expected
    assert set(reasons.values()) == {"length"}
    stats = eng.stats()
    assert stats.num_preemptions > 0
    assert stats.num_kv_blocks_used == 0 and stats.num_kv_blocks_free == 12


@pytest.mark.parametrize("bad, field", [
    (req("bad", [1, 2, 1000]), "prompt_token_ids"),
    (req("bad", [1, -2, 3]), "prompt_token_ids"),
    (req("bad", []), "prompt_token_ids"),
    (req("bad", [1, 2], 0), "max_tokens"),
    (req("bad", list(range(3, 515))), "prompt_token_ids"),  # longer than max_context 512
    (req("ok", [1, 2, 3]), "request_id"),  # duplicate of the running request
    (req("bad", [1, 2], sampling=SamplingParams(temperature=-1.0)), "temperature"),
    (req("bad", [1, 2], sampling=SamplingParams(top_p=0.0)), "top_p"),
    (req("bad", [1, 2], sampling=SamplingParams(stop_token_ids=(5000,))), "stop_token_ids"),
    (req("bad", [1, 2], salt=-3), "salt"),
    (req("bad", [1, 2], adapter="sql-lora"), "adapter"),  # (LoRA adapters run on vLLM only)
    (req("", [1, 2]), "request_id"),
])
def test_bad_input_is_a_request_error_and_others_keep_running(bad, field):
    eng = engine()
    eng.add_request(req("ok", PROMPT[:30], 6))
    first = eng.step()[0].token_ids
    with pytest.raises(RequestError) as err:
        eng.add_request(bad)
    assert err.value.field == field
    tokens, reasons = drain(eng)
    assert first + tokens["ok"] == solo(PROMPT[:30], 6) and reasons == {"ok": "length"}


def test_request_that_can_never_fit_the_pool_is_refused():
    eng = engine(num_blocks=4)
    with pytest.raises(RequestError, match="need 5 KV blocks but the pool has 4") as err:
        eng.add_request(req("big", PROMPT[:60], 20))
    assert err.value.field == "max_tokens"


def test_priority_runs_first_under_batch_limit():
    eng = engine(max_batch_size=1)
    eng.add_request(req("low", PROMPT[:20], 3))
    eng.add_request(req("high", PROMPT[20:40], 3, priority=2))
    first = eng.step()
    assert [o.request_id for o in first] == ["high"]


def test_stop_token_ids_and_stop_strings():
    ref = solo(PROMPT[:50], 10)
    eng = engine()
    eng.add_request(req("t", PROMPT[:50], sampling=SamplingParams(max_tokens=10,
                                                                  stop_token_ids=(ref[3],))))
    tokens, reasons = drain(eng)
    assert tokens["t"] == ref[:4] and reasons["t"] == "stop"

    eng = engine(detokenize=lambda ids: "".join(f"<{t}>" for t in ids))
    eng.add_request(req("s", PROMPT[:50], sampling=SamplingParams(
        max_tokens=10, stop=(f"<{ref[5]}><{ref[6]}>",))))
    tokens, reasons = drain(eng)
    assert tokens["s"] == ref[:7] and reasons["s"] == "stop"

    # under min_tokens a stop string must end in a later token's text (one that begins before may)
    eng = engine(detokenize=lambda ids: "s" * len(ids))
    for rid, min_tokens, stopped_at in (("early", 0, 2), ("held", 5, 6)):
        eng.add_request(req(rid, PROMPT[:50], sampling=SamplingParams(max_tokens=10, stop=("ss",),
                                                                       min_tokens=min_tokens)))
        tokens, reasons = drain(eng)
        assert len(tokens[rid]) == stopped_at and reasons[rid] == "stop"


def test_abort_frees_blocks_and_unknown_ids_are_ignored():
    eng = engine()
    eng.add_request(req("a", PROMPT, 50))
    eng.step()
    assert eng.stats().num_kv_blocks_used == 13
    eng.abort("a")
    eng.abort("nope")
    assert not eng.has_work() and eng.stats().num_kv_blocks_used == 0
    eng.add_request(req("a", PROMPT, 1))  # the id is free again
    assert drain(eng)[1] == {"a": "length"}


def test_stats_fill_every_field():
    eng = engine(num_blocks=64, max_batch_size=1, max_num_batched_tokens=32)
    eng.add_request(req("a", PROMPT[:40], 4))
    eng.add_request(req("b", PROMPT[:40], 4))
    eng.step()
    s = eng.stats()
    assert (s.num_running, s.num_waiting) == (1, 1)
    assert (s.num_kv_blocks_total, s.num_kv_blocks_used, s.num_kv_blocks_free) == (64, 2, 62)
    assert s.num_computed_tokens == 32 and s.num_generated_tokens == 0
    assert s.num_waiting_prefill_tokens == 8 + 40
    drain(eng)
    s = eng.stats()
    assert s.num_generated_tokens == 8 and s.prefix_hit_blocks == 2
    assert s.prefix_lookup_blocks == 4 and s.num_computed_tokens == 40 + 3 + 8 + 3


# -- timing ----------------------------------------------------------------------

def test_virtual_clock_reports_modelled_time_and_live_clock_sleeps():
    timing = MockTiming(prefill_base_s=0.01, prefill_s_per_token=0.001, decode_base_s=0.02,
                        decode_s_per_seq=0.005, decode_s_per_ctx_token=0.0001)
    eng = engine(timing=timing)
    eng.add_request(req("a", PROMPT[:100], 2))
    eng.step()
    assert eng.last_step_duration_s == pytest.approx(0.01 + 0.1)
    eng.step()  # decode at context 101
    assert eng.last_step_duration_s == pytest.approx(0.02 + 0.005 + 0.0101)
    assert eng.virtual_time_s == pytest.approx(0.11 + 0.0351)

    slept: list[float] = []
    live = MockEngine(timing, clock="live", sleep=slept.append, num_blocks=64)
    live.add_request(req("a", PROMPT[:100], 1))
    live.step()
    assert len(slept) == 1 and 0.05 < slept[0] <= 0.11


# -- disaggregation ------------------------------------------------------------------

def prefill_and_export(prompt, rid="d"):
    pre = engine()
    pre.add_request(req(rid, prompt, 1, prefill_only=True))
    tokens, reasons = drain(pre)
    return pre, pre.export_kv(rid), tokens[rid], reasons[rid]


@pytest.mark.parametrize("length", [200, 192])  # partial last block, block-aligned
def test_export_import_continues_like_one_engine(length):
    prompt = PROMPT[:length]
    pre, export, first, reason = prefill_and_export(prompt)
    assert reason == "length" and first == [export.first_token]
    assert export.block_hashes == hash_blocks(prompt, BS)
    assert pre.stats().num_kv_blocks_used == -(-length // BS)  # pinned until release

    dec = engine()
    imp = dec.begin_import(req("d", prompt, 12), export.block_hashes)
    assert imp.missing_idx == list(range(length // BS))
    for idx, view in zip(imp.missing_idx, imp.dest_views):
        view[:] = export.block_views[idx]
    pre.release_export("d")
    assert pre.stats().num_kv_blocks_used == 0
    dec.commit_import("d", export.first_token)
    tokens, reasons = drain(dec)
    assert [export.first_token] + tokens["d"] == solo(prompt, 12)
    assert reasons == {"d": "length"}
    # prompt KV was imported, not recomputed: only the partial tail + first token ran
    assert dec.stats().num_computed_tokens == length % BS + 1 + 10


def test_import_reuses_local_prefix_and_registers_imported_blocks():
    prompt = PROMPT[:200]
    _, export, _, _ = prefill_and_export(prompt)
    dec = engine()
    dec.add_request(req("warm", prompt[:100], 1))
    drain(dec)
    imp = dec.begin_import(req("d", prompt, 4), export.block_hashes)
    assert imp.missing_idx == list(range(6, 12))  # 6 blocks held locally already
    for idx, view in zip(imp.missing_idx, imp.dest_views):
        view[:] = export.block_views[idx]
    dec.commit_import("d", export.first_token)
    drain(dec)
    dec.add_request(req("again", prompt, 1))
    out = dec.step()
    assert out[0].num_cached_tokens == 192  # later requests hit the imported blocks


def test_corrupt_import_changes_the_output():
    prompt = PROMPT[:200]
    _, export, _, _ = prefill_and_export(prompt)
    dec = engine()
    imp = dec.begin_import(req("d", prompt, 6), export.block_hashes)
    for idx, view in zip(imp.missing_idx, imp.dest_views):
        view[:] = export.block_views[idx]
    imp.dest_views[3][0] ^= 0xFF
    dec.commit_import("d", export.first_token)
    tokens, _ = drain(dec)
    assert [export.first_token] + tokens["d"] != solo(prompt, 6)


def test_import_errors_and_cancel():
    prompt = PROMPT[:64]
    _, export, _, _ = prefill_and_export(prompt)
    dec = engine(num_blocks=8)
    with pytest.raises(RequestError, match="salt differ") as err:
        dec.begin_import(req("d", prompt, 4, salt=9), export.block_hashes)
    assert err.value.field == "block_hashes"
    with pytest.raises(RequestError, match="5 block hashes"):
        dec.begin_import(req("d", prompt, 4), export.block_hashes + [1])
    with pytest.raises(RequestError, match="no import in progress"):
        dec.commit_import("d", 5)
    dec.begin_import(req("d", prompt, 4), export.block_hashes)
    assert dec.stats().num_kv_blocks_used == 4
    dec.begin_import(req("e", PROMPT[64:128], 4), hash_blocks(PROMPT[64:128], BS))
    with pytest.raises(RequestError, match="needs 4 blocks, 0 free"):
        dec.begin_import(req("f", PROMPT[128:192], 4), hash_blocks(PROMPT[128:192], BS))
    with pytest.raises(RequestError, match="duplicate request_id 'e'"):
        dec.add_request(req("e", [1, 2], 1))
    dec.cancel_import("d")
    dec.cancel_import("e")
    assert dec.stats().num_kv_blocks_used == 0 and not dec.has_work()


def test_import_with_max_tokens_one_finishes_at_commit():
    prompt = PROMPT[:40]
    _, export, _, _ = prefill_and_export(prompt)
    dec = engine()
    imp = dec.begin_import(req("d", prompt, 1), export.block_hashes)
    for idx, view in zip(imp.missing_idx, imp.dest_views):
        view[:] = export.block_views[idx]
    dec.commit_import("d", export.first_token)
    outs = dec.step()
    assert [(o.token_ids, o.finished, o.finish_reason) for o in outs] == [([], True, "length")]
    assert dec.stats().num_kv_blocks_used == 0


def test_stale_exports_are_released():
    pre, export, _, _ = prefill_and_export(PROMPT[:40], rid="old")
    with pytest.raises(RequestError, match="no KV to export"):
        pre.export_kv("missing")
    pre.add_request(req("busy", PROMPT[50:90], 3))
    drain(pre)  # advances the virtual clock
    assert pre.release_stale_exports(max_age_s=1e9) == []
    assert pre.release_stale_exports(max_age_s=0.0) == ["old"]
    assert pre.stats().num_kv_blocks_used == 0


# -- KV events and the lower tier ------------------------------------------------------

def test_kv_events_carry_hashes_in_order_with_parent():
    events: list[KvEvent] = []
    eng = engine(num_blocks=8, max_num_batched_tokens=32)
    eng.set_kv_event_listener(events.append)
    prompt = PROMPT[:80]
    eng.add_request(req("a", prompt, 1))
    drain(eng)
    h = hash_blocks(prompt, BS)
    # chunks of 32 tokens: blocks 0-1, then 2-3, then 4 (last chunk)
    assert events == [KvEvent("stored", h[0:2], None), KvEvent("stored", h[2:4], h[1]),
                      KvEvent("stored", h[4:5], h[3])]
    events.clear()
    eng.add_request(req("b", PROMPT[100:180], 1))
    drain(eng)
    removed = [e for e in events if e.kind == "removed"]
    # 8 blocks: 3 empty ones used first, then a's tail blocks go first
    assert [x for e in removed for x in e.block_hashes] == [h[4], h[3]]


class DictTier(LowerTier):
    def __init__(self):
        self.data: dict[int, bytes] = {}
        self.offloaded: list[int] = []
        self.fetched: list[int] = []

    def offload(self, block_hash, parent_hash, view, priority=0, ttl_s=None):
        self.offloaded.append(block_hash)
        self.data[block_hash] = bytes(view)

    def fetch(self, block_hash, dest_view):
        if block_hash not in self.data:
            return False
        dest_view[:] = self.data[block_hash]
        self.fetched.append(block_hash)
        return True

    def contains(self, block_hash):
        return block_hash in self.data


def test_evicted_blocks_go_to_the_tier_and_come_back_instead_of_recompute():
    tier = DictTier()
    eng = engine(num_blocks=8)
    eng.set_lower_tier(tier)
    prompt = PROMPT[:100]  # 6 full blocks + 4 tokens
    eng.add_request(req("a", prompt, 1))
    expected = drain(eng)[0]["a"]
    eng.add_request(req("b", PROMPT[100:200], 1))  # needs 7 blocks: evicts a's cached blocks
    drain(eng)
    h = hash_blocks(prompt, BS)
    assert tier.offloaded == [h[5], h[4], h[3], h[2], h[1]]
    before = eng.stats().num_computed_tokens
    eng.add_request(req("a2", prompt, 1))
    out = drain(eng)[0]["a2"]
    assert out == expected  # the fetched payloads are the real KV
    assert tier.fetched == h[1:6] and eng.num_tier_hit_blocks == 5
    assert eng.stats().num_computed_tokens - before == 4  # only the partial tail block ran


# -- whole-engine properties -------------------------------------------------------------

@pytest.mark.parametrize("seed, num_blocks", [(7, 12), (22, 8), (33, 8), (5, 10)])
def test_random_mix_with_aborts_matches_solo_runs_and_leaks_nothing(seed, num_blocks):
    # (22, 8) and (33, 8) admit a high-priority request by preempting the holder of its prefix
    import random

    rng = random.Random(seed)
    eng = engine(num_blocks=num_blocks, max_batch_size=4, max_num_batched_tokens=48)
    prompts, max_tokens, aborted = {}, {}, set()
    shared = PROMPT[:40]
    tokens: dict[str, list[int]] = {}
    for step in range(400):
        if step < 60 and rng.random() < 0.3:
            rid = f"r{step}"
            tail = [rng.randint(3, 999) for _ in range(rng.randint(1, 30))]
            prompts[rid] = shared[:rng.randint(0, 40)] + tail
            max_tokens[rid] = rng.randint(1, 30)
            eng.add_request(req(rid, prompts[rid], max_tokens[rid], priority=rng.randint(0, 2)))
        if tokens and rng.random() < 0.03:
            victim = rng.choice(sorted(tokens))
            eng.abort(victim)
            aborted.add(victim)
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert not eng.has_work()
    for rid, prompt in prompts.items():
        if rid not in aborted:
            assert tokens[rid] == solo(prompt, max_tokens[rid]), rid
    assert eng.stats().num_kv_blocks_used == 0
    assert eng.blocks.num_free_blocks == num_blocks
    assert eng.stats().num_preemptions > 0 and eng.stats().prefix_hit_blocks > 0


@pytest.mark.parametrize("seed", [26, 113, 198, 3, 17])
def test_random_disaggregated_mix_with_a_tier_and_sessions_matches_solo_runs_and_leaks_nothing(seed):
    # A prefill engine exports into a small decode engine with a host tier, beside local requests,
    # aborts, cancelled imports, retention, expiry and closed sessions; the decode engine's and
    # the tier's events are replayed into a router index at the end. Seeds 26, 113 and 198 stalled
    # (imports waiting for a block, each holding the blocks the others needed) before the fix.
    import random

    from dyn.kv.host_tier import HostTier
    from dyn.kv.retention import Retention
    from dyn.router.index import KvIndex

    rng = random.Random(seed)
    eng = engine(num_blocks=rng.choice([8, 10, 14]), max_batch_size=4, max_num_batched_tokens=48)
    pre = engine(num_blocks=16, max_batch_size=4, max_num_batched_tokens=48)
    events: list[KvEvent] = []
    eng.set_kv_event_listener(events.append)
    tier = None
    if tier_blocks := rng.choice([0, 4, 16]):
        tier = HostTier(eng.block_bytes, eng.block_bytes * tier_blocks, listener=events.append,
                        clock=lambda: eng.virtual_time_s)
        eng.set_lower_tier(tier)
    shared = PROMPT[:rng.choice([20, 40, 64])]
    prompts, max_tokens, dropped, tokens, exporting = {}, {}, set(), {}, {}
    for step in range(600):
        r = rng.random()
        if step < 80 and r < 0.3:
            rid = f"r{step}"
            prompts[rid] = shared[:rng.randint(0, len(shared))] + [rng.randint(3, 999) for _ in range(rng.randint(1, 30))]
            max_tokens[rid] = rng.randint(1, 25)
            kw = {}
            if rng.random() < 0.3:
                kw = dict(retention=Retention(rng.randint(0, 3), rng.choice([None, 0.01, 1.0])),
                          session_id=rng.choice(["s1", "s2"]))
            if rng.random() < 0.3:
                pre.add_request(req(rid, prompts[rid], 1, prefill_only=True, **kw))
                exporting[rid] = kw
            else:
                eng.add_request(req(rid, prompts[rid], max_tokens[rid], priority=rng.randint(0, 2), **kw))
        if r > 0.97 and tokens:
            dropped.add(victim := rng.choice(sorted(tokens)))
            eng.abort(victim)
        if r < 0.02:
            eng.expire()
        if 0.5 < r < 0.52:
            eng.release_session(rng.choice(["s1", "s2"]))
        for out in pre.step():
            rid = out.request_id
            export = pre.export_kv(rid)
            try:
                imp = eng.begin_import(req(rid, prompts[rid], max_tokens[rid], **exporting.pop(rid)),
                                       export.block_hashes)
            except RequestError:  # pool full: the frontend would prefill locally
                dropped.add(rid)
                pre.release_export(rid)
                continue
            for idx, view in zip(imp.missing_idx, imp.dest_views):
                view[:] = export.block_views[idx]
            pre.release_export(rid)
            if rng.random() < 0.1:
                eng.cancel_import(rid)
                dropped.add(rid)
            else:
                tokens[rid] = [export.first_token]
                eng.commit_import(rid, export.first_token)
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert not eng.has_work() and not pre.has_work() and not exporting
    for rid, prompt in prompts.items():
        if rid not in dropped:
            assert tokens[rid] == solo(prompt, max_tokens[rid]), rid
    assert eng.stats().num_kv_blocks_used == 0 and pre.stats().num_kv_blocks_used == 0
    # what a router rebuilds from the events is what the pool and the tier hold
    index = KvIndex()
    for event in events:
        (index.store if event.kind == "stored" else index.remove)("w", event.tier, event.block_hashes)
    seen = index.blocks_of("w")
    assert len(seen["device"]) == eng.blocks.num_cached_blocks
    assert all(eng.blocks.lookup(h) is not None for h in seen["device"])
    assert len(seen["host"]) == (len(tier) if tier else 0) and all(tier.contains(h) for h in seen["host"])


def test_engine_core_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import dyn.engine.factory, dyn.engine.mock, dyn.engine.engine; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"


def test_factory_builds_a_mock_engine_from_the_recipe(tmp_path):
    from dyn.config.recipe import ModelSpec, WorkerGroup
    from dyn.engine.factory import create_engine

    spec = ModelSpec(path=str(tmp_path / "no-such-model"), engine="mock", block_size=8,
                     max_context=256, mock=MockTiming(num_kv_blocks=32))
    eng = create_engine(spec, WorkerGroup(role="both", max_batch_size=3), device="cpu")
    assert isinstance(eng, MockEngine) and eng.block_size == 8
    assert eng.stats().num_kv_blocks_total == 32 and eng.scheduler.max_batch_size == 3


def test_factory_torch_engine_keeps_greedy_output_under_preemption_and_caching(tmp_path):
    """The same Engine over the real TorchModelRunner: recompute and prefix hits are exact."""
    pytest.importorskip("torch")
    from dyn.config.recipe import ModelSpec, WorkerGroup
    from dyn.engine.factory import create_engine
    from dyn.engine.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, seed=3)
    spec = ModelSpec(path=str(tmp_path), engine="torch", dtype="float32", block_size=4,
                     max_context=128)
    prompts = {f"r{i}": [(i * 37 + j) % 400 + 10 for j in range(18)] for i in range(4)}

    def run(num_blocks_bytes, group):
        eng = create_engine(spec, group, device="cpu", kv_memory_bytes=num_blocks_bytes,
                            cpu_threads=1)
        for rid, p in prompts.items():
            eng.add_request(req(rid, p, 10, sampling=SamplingParams(max_tokens=10,
                                                                    ignore_eos=True)))
        return eng, drain(eng)[0]

    big, expected = run(1 << 20, WorkerGroup(role="both"))
    block_bytes = big.block_bytes
    small, got = run(12 * block_bytes, WorkerGroup(role="both", max_num_batched_tokens=16))
    assert small.stats().num_kv_blocks_total == 12 and small.stats().num_preemptions > 0
    assert got == expected
    before = big.stats().num_computed_tokens
    big.add_request(req("again", prompts["r1"], 10, sampling=SamplingParams(max_tokens=10,
                                                                           ignore_eos=True)))
    assert drain(big)[0]["again"] == expected["r1"]
    assert big.stats().num_computed_tokens - before == 2 + 9  # 4 blocks hit of 18 tokens


def test_retention_survives_pressure_until_the_session_is_released():
    from dyn.kv.retention import Retention

    engine = MockEngine(MockTiming(), block_size=4, num_blocks=12, clock="virtual")

    def run(rid, prompt, **kw):
        engine.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=1), **kw))
        while engine.has_work():
            outs = engine.step()
        return outs[-1].num_cached_tokens

    kept = list(range(100, 117))
    run("k", kept, retention=Retention(priority=3), session_id="s")
    for i in range(3):  # 3 x 5 blocks through a 12-block pool
        run(f"f{i}", list(range(200 + 20 * i, 217 + 20 * i)))
    assert run("k2", kept) == 16
    engine.release_session("s")
    for i in range(3):
        run(f"g{i}", list(range(400 + 20 * i, 417 + 20 * i)))
    assert run("k3", kept) == 0


def test_a_prefix_block_changed_under_a_running_request_changes_its_next_block_of_tokens():
    """The mock reads a request's earlier blocks again each time its context reaches a new block,
    so KV that changes under it (a wrong block id, a bad write) shows in its tokens within one block."""
    def run(corrupt_after: int | None) -> list[int]:
        eng = engine()
        eng.add_request(req("r", range(1, 41), max_tokens=60))  # blocks 0, 1 full; 2 partial
        tokens: list[int] = []
        while eng.has_work():
            for out in eng.step():
                tokens += out.token_ids
            if len(tokens) == corrupt_after:
                seq = eng._seqs["r"]
                view = eng.runner.block_view(seq.block_ids[0])
                view[:8] = bytes(b ^ 0xFF for b in view[:8])
        return tokens

    clean, corrupted = run(None), run(5)
    assert corrupted[:5] == clean[:5]
    first_diff = next(i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b)
    assert first_diff <= 5 + BS


def test_a_long_context_reads_its_blocks_with_numpy_and_picks_the_same_tokens(monkeypatch):
    """Past VECTOR_FROM_BLOCKS blocks the context is summed with numpy (uint64, wrapping): the
    same tokens as the plain-int sum, for prompts that cross the threshold while decoding."""
    import dyn.engine.mock as mock

    def run() -> list[list[int]]:
        eng = MockEngine(block_size=BS, vocab_size=50_000, max_context=4096, clock="virtual", num_blocks=512)
        for i, n in enumerate((1000, 2040, 3000)):  # 63, 128 (crosses 128 blocks decoding), 188 blocks
            eng.add_request(req(f"r{i}", range(7 + i, 7 + i + n), max_tokens=40))
        tokens: dict[str, list[int]] = {}
        while eng.has_work():
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return [tokens[f"r{i}"] for i in range(3)]

    assert mock.VECTOR_FROM_BLOCKS < 187
    vectored = run()
    monkeypatch.setattr(mock, "VECTOR_FROM_BLOCKS", 1 << 30)
    assert run() == vectored and all(len(t) == 40 for t in vectored)


def test_mock_engines_of_one_host_share_one_loaded_tokenizer(tmp_path):
    """Hosted mock workers (dyn.worker.host) pass one `detokenizers` map: the checkpoint's
    tokenizer is loaded once for all of them (72 loads took ~9 s on one thread, long enough
    to starve the host's heartbeats)."""
    from dyn.config.recipe import ModelSpec, WorkerGroup
    from dyn.engine.factory import create_engine
    from dyn.engine.tiny import write_tiny_checkpoint

    path = str(write_tiny_checkpoint(tmp_path / "m", seed=1))
    spec, group, loaded = ModelSpec(path=path, engine="mock"), WorkerGroup("both"), {}
    a, b = (create_engine(spec, group, device="cpu", detokenizers=loaded) for _ in range(2))
    assert list(loaded) == [path] and a.detokenize is b.detokenize is not None
    assert create_engine(spec, group, device="cpu").detokenize is not a.detokenize  # alone: its own
