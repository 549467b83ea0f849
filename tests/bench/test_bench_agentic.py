"""scripts/bench_agentic.py: sessions are chains of trace requests extending the previous turn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_agentic.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_agentic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sessions_chain_requests_that_extend_the_previous_turns_full_blocks(tmp_path):
    rows = [[0, 1, 2], [0, 5, 6], [0, 1, 3, 4],  # turn 2 of the first: its partial block 2 completed as 3
            [0, 5, 7], [0, 1, 3, 8, 9], [0, 20]]  # 3rd turn of the first; one-shot requests
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i, "input_length": 10, "output_length": 2,
                                         "hash_ids": ids}) + "\n" for i, ids in enumerate(rows)))
    sessions = _bench().load_sessions(trace, num_sessions=5, max_turns=5)
    assert sessions == [[[0, 1, 2], [0, 1, 3, 4], [0, 1, 3, 8, 9]], [[0, 5, 6], [0, 5, 7]]]


def test_sessions_from_the_shipped_mooncake_slice_extend_each_turn():
    trace = Path(__file__).resolve().parents[1] / "data" / "traces" / "mooncake" / "conversation_trace_head300.jsonl"
    sessions = _bench().load_sessions(trace, num_sessions=50, max_turns=10)
    assert sessions and all(len(chain) >= 2 for chain in sessions)
    for chain in sessions:
        for prev, turn in zip(chain, chain[1:]):
            assert turn[:len(prev) - 1] == prev[:-1] and len(turn) > len(prev) - 1
