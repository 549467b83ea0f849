"""Trace parsing (slices of the real traces), prompt synthesis and percentiles."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from trace_data import AZURE_CONV, MOONCAKE

from dyn.bench import (PromptSynthesizer, SynthError, TraceError, TraceRequest, load_trace, percentile,
                       read_counters, summarize)



@pytest.fixture
def mooncake_slice(tmp_path: Path) -> Path:
    lines = list(itertools.islice(MOONCAKE.open(), 200))
    path = tmp_path / "slice.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.fixture
def azure_slice(tmp_path: Path) -> Path:
    with AZURE_CONV.open(newline="") as handle:
        text = "".join(itertools.islice(handle, 51))
    path = tmp_path / "slice.csv"
    path.write_text(text.rstrip("\r\n"), newline="")  # like the original: CRLF, no final newline
    return path


def test_mooncake_slice_parses(mooncake_slice: Path):
    trace = load_trace(mooncake_slice)
    assert len(trace.requests) == 200 and trace.block_tokens == 512
    first = trace.requests[0]
    assert first == TraceRequest(0.0, 6758, 500, tuple(range(14)))
    assert all(r.hash_ids[0] == 0 for r in trace.requests)  # the shared system prompt
    assert [r.arrival_s for r in trace.requests] == sorted(r.arrival_s for r in trace.requests)
    assert load_trace(mooncake_slice, max_requests=7).requests == trace.requests[:7]


def test_azure_slice_parses_wall_clock_to_offsets(azure_slice: Path):
    trace = load_trace(azure_slice)
    assert len(trace.requests) == 50 and trace.block_tokens == 0
    assert trace.requests[0] == TraceRequest(0.0, 374, 44, ())
    # 18:15:46.6805900 -> 18:15:50.9951690
    assert trace.requests[1].arrival_s == pytest.approx(4.314579)
    assert trace.requests[1].input_length == 396 and trace.requests[1].output_length == 109


@pytest.mark.parametrize("line, field", [
    ('{"timestamp": 0, "input_length": -5, "output_length": 1, "hash_ids": [0]}', "input_length"),
    ('{"timestamp": "x", "input_length": 5, "output_length": 1, "hash_ids": [0]}', "timestamp"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [0]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1.5, "hash_ids": [0]}', "output_length"),
])
def test_bad_mooncake_record_names_line_and_field(tmp_path: Path, line: str, field: str):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n' + line)
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert (err.value.line, err.value.field) == (2, field)
    assert f"{path}:2" in str(err.value)


def test_other_trace_errors(tmp_path: Path):
    (tmp_path / "x.jsonl").write_text("{nope\n")
    with pytest.raises(TraceError, match=r"x.jsonl:1: not JSON"):
        load_trace(tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("a,b,c\r\n1,2,3")
    with pytest.raises(TraceError, match="header must start with TIMESTAMP"):
        load_trace(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\nyesterday,1,2")
    with pytest.raises(TraceError, match="y.csv:2: TIMESTAMP"):
        load_trace(tmp_path / "y.csv")
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="unknown trace format '.parquet'"):
        load_trace(tmp_path / "t.parquet")
    with pytest.raises(TraceError, match="is a directory; expected a .jsonl"):
        load_trace(tmp_path)
    with pytest.raises(TraceError, match="trace: is a file without an extension"):
        load_trace(tmp_path / "trace")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")


def test_shared_hash_ids_share_token_prefixes_and_are_deterministic(mooncake_slice: Path):
    trace = load_trace(mooncake_slice)
    synth = PromptSynthesizer(trace.block_tokens, block_tokens=16, vocab_size=1000, seed=3)
    a, b = trace.requests[0], trace.requests[1]  # share only hash id 0
    ta, tb = synth.prompt_tokens(a, 0), synth.prompt_tokens(b, 1)
    assert len(ta) == round(6758 * 16 / 512) and len(tb) == round(7322 * 16 / 512)
    assert ta[:16] == tb[:16] and ta[16:32] != tb[16:32]
    assert all(100 <= t < 1000 for t in ta)
    again = PromptSynthesizer(trace.block_tokens, block_tokens=16, vocab_size=1000, seed=3)
    assert again.prompt_tokens(a, 0) == ta
    other_seed = PromptSynthesizer(trace.block_tokens, block_tokens=16, vocab_size=1000, seed=4)
    assert other_seed.prompt_tokens(a, 0) != ta


def test_token_prefix_sharing_matches_hash_id_sharing_over_the_slice(mooncake_slice: Path):
    trace = load_trace(mooncake_slice)
    synth = PromptSynthesizer(trace.block_tokens, block_tokens=8, vocab_size=50000)
    prompts = [synth.prompt_tokens(r, i) for i, r in enumerate(trace.requests[:60])]
    for (i, ra), (j, rb) in itertools.combinations(enumerate(trace.requests[:60]), 2):
        shared_ids = sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1],
                                                         zip(ra.hash_ids, rb.hash_ids)))
        pa, pb = np.array(prompts[i]), np.array(prompts[j])
        n = min(len(pa), len(pb))
        diff = np.flatnonzero(pa[:n] != pb[:n])
        shared_tokens = int(diff[0]) if len(diff) else n
        assert shared_tokens // 8 == min(shared_ids, n // 8), (i, j)


def test_requests_without_hash_ids_get_unique_reproducible_prompts():
    synth = PromptSynthesizer(0, block_tokens=None, length_scale=0.5, seed=1)
    r = TraceRequest(0.0, 100, 10)
    assert len(synth.prompt_tokens(r, 0)) == 50
    assert synth.prompt_tokens(r, 0) == synth.prompt_tokens(r, 0)
    assert synth.prompt_tokens(r, 0)[:10] != synth.prompt_tokens(r, 1)[:10]
    with pytest.raises(SynthError, match="min_token_id"):
        PromptSynthesizer(512, vocab_size=50, min_token_id=100)


def test_percentiles_match_numpy_and_summaries():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=101).tolist()
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert summarize([1.0, 2.0, 3.0, 4.0]) == {"p50": 2.5, "p90": pytest.approx(3.7),
                                                "p99": pytest.approx(3.97), "mean": 2.5}
    assert summarize([])["p99"] is None


def test_read_counters_sums_labels_and_accepts_family_names():
    text = ("# TYPE dyn_prefix_cache_hit_blocks_total counter\n"
            'dyn_prefix_cache_hit_blocks_total{worker="a"} 3\n'
            'dyn_prefix_cache_hit_blocks_total{worker="b"} 4\n'
            'dyn_prefix_cache_hit_blocks_created{worker="a"} 1.7e9\n'
            "# TYPE other gauge\nother 9\n")
    assert read_counters(text, ["dyn_prefix_cache_hit_blocks_total", "other", "missing"]) == {
        "dyn_prefix_cache_hit_blocks_total": 7.0, "other": 9.0}
    assert read_counters(text, ["dyn_prefix_cache_hit_blocks"]) == {"dyn_prefix_cache_hit_blocks": 7.0}
