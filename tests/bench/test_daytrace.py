"""The synthetic day: Mooncake-shaped, calibrated, deterministic, streamed."""

from __future__ import annotations

import io
import json
import statistics

import pytest
from typer.testing import CliRunner

from dyn.bench.daytrace import DaySpec, SynthError, synth_day, write_day
from dyn.bench.trace import load_trace
from dyn.cli.main import app

N = 6000


@pytest.fixture(scope="module")
def day() -> list[dict]:
    return list(synth_day(DaySpec(N, seed=7)))


def test_records_are_mooncake_and_load(tmp_path):
    path = tmp_path / "day.jsonl"
    assert write_day(DaySpec(500, seed=1), path) == 500
    trace = load_trace(path)
    assert len(trace.requests) == 500 and trace.block_tokens == 512
    for req in trace.requests:
        assert len(req.hash_ids) == -(-req.input_length // 512)
        assert req.hash_ids[0] == 0  # the shared system block


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = io.StringIO(), io.StringIO(), io.StringIO()
    write_day(DaySpec(800, seed=3), a)
    write_day(DaySpec(800, seed=3), b)
    write_day(DaySpec(800, seed=4), c)
    assert a.getvalue() == b.getvalue()
    assert a.getvalue() != c.getvalue()


def test_lengths_match_the_calibration_trace(day):
    # Mooncake conversation trace: mean input 12,035 tokens, median 6,909; mean output 343, median 350.
    inputs = [r["input_length"] for r in day]
    outputs = [r["output_length"] for r in day]
    assert 9_000 < statistics.mean(inputs) < 16_000
    assert 5_000 < statistics.median(inputs) < 9_000
    assert 290 < statistics.mean(outputs) < 400
    assert 1 <= min(outputs) and max(outputs) <= 2000


def test_prefix_reuse_and_chain_property(day):
    # 36.6% of the Mooncake trace's hash ids repeat a prefix already seen; ids chain to one parent.
    seen: set[int] = set()
    parent: dict[int, int | None] = {}
    reused = total = 0
    for r in day:
        ids = r["hash_ids"]
        for i, h in enumerate(ids):
            assert parent.setdefault(h, ids[i - 1] if i else None) == (ids[i - 1] if i else None)
        lead = 0
        for h in ids:
            if h not in seen:
                break
            lead += 1
        reused += lead
        total += len(ids)
        seen.update(ids)
    assert 0.25 < reused / total < 0.45


def test_multi_turn_sessions_extend_their_previous_turn(day):
    # A follow-up resends the previous prompt's full blocks: some earlier record's ids minus its
    # last block are a prefix of it. The trace has 1.49 turns per session (33% of requests follow up).
    heads: set[tuple[int, ...]] = set()
    follow = 0
    for r in day:
        ids = tuple(r["hash_ids"])
        if any(ids[:k] in heads for k in range(2, len(ids))):
            follow += 1
        heads.add(ids[:-1])
    assert 0.2 < follow / len(day) < 0.45


def test_arrivals_are_ordered_diurnal_and_span_the_day(day):
    times = [r["timestamp"] / 1000 for r in day]
    assert times == sorted(times)
    assert times[-1] > 0.9 * 86_400
    per_hour = [0] * 24
    for t in times:
        per_hour[min(int(t // 3600), 23)] += 1
    assert max(per_hour) > 2 * min(per_hour)  # peak-to-trough 3:1 by design
    assert max(range(24), key=per_hour.__getitem__) in range(10, 19)  # peak mid-afternoon


def test_bad_arguments_are_refused():
    with pytest.raises(SynthError, match="--requests"):
        list(synth_day(DaySpec(0)))
    with pytest.raises(SynthError, match="duration"):
        list(synth_day(DaySpec(5, duration_s=0)))


def test_cli_writes_the_file(tmp_path):
    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(app, ["trace", "synth", "--requests", "50", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 50 and json.loads(lines[0])["hash_ids"][0] == 0
    bad = CliRunner().invoke(app, ["trace", "synth", "--requests", "0", "--out", str(out)])
    assert bad.exit_code == 2


def test_a_streamed_trace_must_be_in_time_order(tmp_path):
    from dyn.bench.trace import TraceError, iter_mooncake

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 10, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n'
                    '{"timestamp": 4, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n')
    with pytest.raises(TraceError) as err:
        list(iter_mooncake(path))
    assert err.value.line == 2 and err.value.field == "timestamp"
    arrivals = [r.arrival_s for r in load_trace(path).requests]
    assert arrivals == sorted(arrivals)  # a loaded trace is sorted instead
