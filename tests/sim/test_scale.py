"""The simulator at many racks: macro decode steps, streamed traces, per-domain routing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyn.bench.daytrace import DaySpec, write_day
from dyn.bench.trace import load_trace
from dyn.config.recipe import MockTiming
from dyn.engine.profile import Hardware, RoleProfile
from dyn.sim.config import SimConfig
from dyn.sim.errors import SimError
from dyn.sim.run import load_inputs, simulate
from dyn.sim.worker import SimWorker
from dyn.sim.workload import SimRequest, build_requests, stream_requests

ROOT = Path(__file__).resolve().parents[2]
TIMING = MockTiming(decode_base_s=0.01, decode_s_per_seq=0.001, decode_s_per_ctx_token=1e-5, num_kv_blocks=4096)


def _decoding_worker(outputs: list[int]) -> SimWorker:
    role = RoleProfile(TIMING, Hardware("cpu", 1, 0.0), max_batch_size=64, max_num_batched_tokens=4096)
    worker = SimWorker("decode-0", "decode", 1, None, role, 16, launched_s=0.0, ready_s=0.0, state="ready")
    for i, out in enumerate(outputs):
        worker.submit(SimRequest(i, 0.0, 64, out, [i * 10 + j for j in range(4)]), prefill=False,
                      decode_here=True)
    return worker


def _by_single_steps(ctx: int, n: int, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(TIMING.decode_base_s + TIMING.decode_s_per_seq * n + TIMING.decode_s_per_ctx_token * ctx)
        ctx += n
    return out


def test_a_decode_batch_runs_to_its_next_finish_in_one_event():
    worker = _decoding_worker([40, 90, 90])
    duration = worker.start_step()
    ctx = worker.ctx_sum
    singles = _by_single_steps(ctx, 3, 39)  # the 40-token request finishes after 39 more steps
    assert worker.step_count == 39
    assert duration == pytest.approx(sum(singles))
    outcome = worker.finish_step()
    assert [j.req.idx for j in outcome.finished] == [0]
    assert worker.ctx_sum == ctx + 3 * 39 - (64 + 40)
    assert worker.start_step() == pytest.approx(sum(_by_single_steps(worker.ctx_sum, 2, 50)))


def test_new_work_cuts_a_macro_step_at_the_next_step_boundary():
    worker = _decoding_worker([200])
    worker.start_step()
    singles = _by_single_steps(worker.ctx_sum, 1, 199)
    elapsed = sum(singles[:10]) + singles[10] / 2  # halfway through step 11
    cut = worker.cut_at(elapsed)
    assert worker.step_count == 11 and cut == pytest.approx(sum(singles[:11]))
    assert worker.step_epoch == 1  # the old completion event is now stale
    assert worker.cut_at(cut) is None  # already ends there


def _day(tmp_path, n: int) -> Path:
    path = tmp_path / "day.jsonl"
    write_day(DaySpec(n, seed=5, duration_s=600.0), path)
    return path


def test_streamed_block_names_share_exactly_where_token_hashes_do(tmp_path):
    path = _day(tmp_path, 300)
    exact = build_requests(load_trace(path), 32)
    named = list(stream_requests(path, 32))
    assert [len(r.block_hashes) for r in exact] == [len(r.block_hashes) for r in named]
    firsts = {}
    for a, b in zip(exact, named):
        for i, (ha, hb) in enumerate(zip(a.block_hashes, b.block_hashes)):
            assert firsts.setdefault(("a", ha), (a.idx, i))[1] == i
            assert (firsts.setdefault(("b", hb), (b.idx, i))) == firsts[("a", ha)]


def test_streamed_run_reports_what_the_loaded_run_does(tmp_path):
    path = _day(tmp_path, 400)
    topo, recipe = ROOT / "topologies/gb200-nvl72.yaml", ROOT / "recipes/llama-3.1-70b-nvl72.yaml"
    loaded = simulate(load_inputs(topo, recipe, path, use_mock=True), SimConfig(), time_scale=1.0)
    streamed = simulate(load_inputs(topo, recipe, path, use_mock=True, stream=True), SimConfig(), time_scale=1.0)
    for key in ("completed", "ttft_ms", "itl_ms", "gpu_seconds", "prefix_hit_rate", "handoffs"):
        assert loaded[key] == streamed[key], key


def test_domain_routing_keeps_pairs_and_sessions_inside_racks(tmp_path):
    path = _day(tmp_path, 600)
    inputs = load_inputs(ROOT / "topologies/gb200-nvl72x4.yaml", ROOT / "recipes/llama-3.1-70b-nvl72.yaml",
                         path, use_mock=True, stream=True)
    report = simulate(inputs, SimConfig(domain_routing=True, block_tokens=512, planner=False), time_scale=1.0)
    assert report["completed"] == 600 and report["sim"]["domain_routing"]
    assert report["handoffs"]["total"] > 100 and report["handoffs"]["cross_domain"] == 0
    assert report["prefix_hit_rate"] > 0.1


def test_block_tokens_must_be_a_multiple_of_the_model_block(tmp_path):
    inputs = load_inputs(ROOT / "topologies/gb200-nvl72.yaml", ROOT / "recipes/llama-3.1-70b-nvl72.yaml",
                         _day(tmp_path, 10), use_mock=True, stream=True)
    with pytest.raises(SimError, match="block_tokens"):
        simulate(inputs, SimConfig(block_tokens=48))
