"""Weights across two hosts over tcp: the peer runs in its own network namespace.

    root namespace (starting worker)  vwA 10.R.S.1 <====> vwB 10.R.S.2  namespace dynwNNNN (peer)

Skips with the reason when namespaces cannot be created (not root, no `ip`).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess

import pytest
import torch

from weight_peer import start_peer, stop
from dyn.engine.torch_runner import TorchModelRunner
from dyn.weights.fetch import Peer, fetch_weights
from dyn.weights.manifest import weights_key


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@pytest.fixture
def namespace():
    """(namespace name, its address, ours); everything removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root for ip netns")
    tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
    ns, host_if, ns_if = f"dynw{tag}", f"vwa{tag}", f"vwb{tag}"
    subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    try:
        _ip("netns", "add", ns)
    except (OSError, FileNotFoundError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{subnet}.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, f"{subnet}.2", f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_weights_stream_over_tcp_from_a_peer_in_another_network_namespace(tiny_dir, namespace):
    ns, peer_address, _ = namespace
    proc, hello = start_peer(tiny_dir, "--bind", peer_address, prefix=("ip", "netns", "exec", ns))
    key = weights_key(tiny_dir, engine="torch", dtype="float32")
    out = {}
    try:
        assert hello["address"].startswith(f"tcp://{peer_address}:")

        def fill(model, _checkpoint_dir):
            out["result"] = asyncio.run(fetch_weights(model.arena, [Peer("ns-peer", hello["address"], "tcp")],
                                                      key=key))

        runner = TorchModelRunner.from_pretrained(tiny_dir, dtype="float32", num_blocks=4, fill_weights=fill)
    finally:
        stop(proc)
    result = out["result"]
    assert result.complete and result.transport == "tcp" and not result.failures
    disk = TorchModelRunner.from_pretrained(tiny_dir, dtype="float32", num_blocks=4)
    assert torch.equal(runner.model.arena.data, disk.model.arena.data)
