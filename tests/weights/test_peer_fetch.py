"""A starting worker's weights from a live peer: equal logits, checksums, fallbacks.

The peer is a real process (weight_peer.py) holding a disk-loaded arena; the
starting side builds its model on an empty arena and fills it through
dyn.weights.fetch over the shuttle (shm and tcp), exactly as `dyn worker` does.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from weight_peer import start_peer, stop
from dyn.engine.loader import Checkpoint
from dyn.engine.runner import SeqWork
from dyn.engine.sampling import SamplingParams
from dyn.engine.torch_runner import TorchModelRunner
from dyn.weights.fetch import FetchConfig, Peer, fetch_weights
from dyn.weights.manifest import bad_tensors, build_manifest, weights_key
from dyn.worker.weights import finish_from_disk

torch.set_num_threads(1)
PROMPT = [5, 17, 99, 260, 3, 44, 501, 7, 8, 9, 300, 12]
FAST_FAIL = FetchConfig(batch_bytes=2 * 65536, request_timeout_s=3.0, stall_timeout_s=1.0)


def _logits(runner: TorchModelRunner) -> torch.Tensor:
    runner.capture_logits = True
    runner.captured_logits.clear()
    runner.execute([SeqWork("r", PROMPT, 0, [0], True, SamplingParams(max_tokens=1), 0)])
    return runner.captured_logits["r"][0]


def _load(model_dir, fill=None) -> TorchModelRunner:
    return TorchModelRunner.from_pretrained(model_dir, dtype="float32", num_blocks=4, fill_weights=fill)


def _from_peers(model_dir, peers, config=FetchConfig(), on_batch=None, then_disk=False):
    """(runner, FetchResult): the model filled from `peers` (and the disk for the rest when asked)."""
    key = weights_key(model_dir, engine="torch", dtype="float32")
    out = {}

    def fill(model, checkpoint_dir):
        out["result"] = asyncio.run(fetch_weights(model.arena, peers, key=key, config=config, on_batch=on_batch))
        if then_disk and not out["result"].complete:
            finish_from_disk(model, Checkpoint(checkpoint_dir), out["result"].have)

    return _load(model_dir, fill), out["result"]


@pytest.fixture(scope="module")
def disk_logits(tiny_dir) -> torch.Tensor:
    return _logits(_load(tiny_dir))


@pytest.fixture(scope="module")
def peer(tiny_dir):
    proc, hello = start_peer(tiny_dir)
    yield hello
    stop(proc)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_second_worker_loads_from_first_and_its_logits_equal_a_disk_loaded_one(tiny_dir, peer, disk_logits,
                                                                               transport):
    runner, result = _from_peers(tiny_dir, [Peer("peer-0", peer["address"], transport)])
    assert result.complete and result.transport == transport and result.peers_used == ["peer-0"]
    assert result.num_bytes == peer["num_blocks"] * runner.model.arena.layout.block_bytes
    assert bad_tensors(runner.model.arena, result.manifest) == []
    assert torch.equal(_logits(runner), disk_logits)


def test_corrupted_chunk_is_caught_by_checksum_refetched_and_never_used(tiny_dir, disk_logits):
    proc, hello = start_peer(tiny_dir, "--corrupt", "2,5")
    try:
        runner, result = _from_peers(tiny_dir, [Peer("peer-0", hello["address"], "tcp")])
    finally:
        stop(proc)
    assert result.complete and result.num_refetched == 2 and not result.failures
    assert torch.equal(_logits(runner), disk_logits)


def test_peer_killed_mid_stream_the_next_peer_finishes_only_what_is_missing(tiny_dir, peer, disk_logits):
    doomed, hello = start_peer(tiny_dir)
    progress = []

    def kill_after_first_batch(peer_id: str, num_done: int) -> None:
        progress.append((peer_id, num_done))
        if peer_id == "doomed" and doomed.poll() is None:
            os.kill(doomed.pid, signal.SIGKILL)

    try:
        runner, result = _from_peers(tiny_dir, [Peer("doomed", hello["address"], "tcp"),
                                                Peer("peer-0", peer["address"], "shm")],
                                     config=FAST_FAIL, on_batch=kill_after_first_batch)
    finally:
        stop(doomed)
    assert progress[0] == ("doomed", 2)  # one batch of two blocks came from the peer that died
    assert result.complete and result.peers_used == ["doomed", "peer-0"]
    assert len(result.failures) == 1 and result.failures[0].startswith("doomed: ")
    # the second peer sent only the blocks the first did not
    assert result.num_bytes == peer["num_blocks"] * runner.model.arena.layout.block_bytes
    assert torch.equal(_logits(runner), disk_logits)


def test_only_peer_killed_mid_stream_the_disk_finishes_and_the_worker_serves_correctly(tiny_dir, disk_logits):
    doomed, hello = start_peer(tiny_dir)

    def kill(peer_id: str, num_done: int) -> None:
        if doomed.poll() is None:
            os.kill(doomed.pid, signal.SIGKILL)

    try:
        runner, result = _from_peers(tiny_dir, [Peer("doomed", hello["address"], "tcp")], config=FAST_FAIL,
                                     on_batch=kill, then_disk=True)
    finally:
        stop(doomed)
    assert not result.complete and 0 < len(result.have) < hello["num_blocks"]
    assert torch.equal(_logits(runner), disk_logits)
    key = weights_key(tiny_dir, engine="torch", dtype="float32")
    assert build_manifest(runner.model.arena, key=key, engine="torch") == result.manifest  # padding zeroed too


def test_a_peer_with_other_weights_is_refused_and_never_written(tmp_path, tiny_dir, disk_logits):
    from dyn.engine.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=8)  # same shapes, other values
    proc, hello = start_peer(other)
    try:
        runner, result = _from_peers(tiny_dir, [Peer("other", hello["address"], "tcp")], then_disk=True)
    finally:
        stop(proc)
    assert not result.have and "holds weights" in result.failures[0]
    assert torch.equal(_logits(runner), disk_logits)
