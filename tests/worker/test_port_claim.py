"""claim_port: below the ephemeral range, never one another live process claimed or one in use, and
free again when its claimant dies (SIGKILL included)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from dyn.errors import LaunchError
from dyn.worker import port_claim
from dyn.worker.port_claim import claim_port, ephemeral_range

CLAIMANT = """
import sys, time
from dyn.worker.port_claim import claim_port
print(claim_port("127.0.0.1", lock_dir=sys.argv[1], below=int(sys.argv[2])), flush=True)
time.sleep(60)
"""


def _free_block(size: int = 8) -> int:
    """The top of `size` ports below the ephemeral range that nothing here listens on."""
    low = ephemeral_range()[0]
    for top in range(low, low - 900, -size):
        if all(port_claim._bindable("127.0.0.1", p) for p in range(top - size, top)):
            return top
    pytest.skip("no free block of ports below the ephemeral range")


def test_claims_are_distinct_across_processes_skip_ports_in_use_and_end_with_the_process(tmp_path):
    top = _free_block()
    holder = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(tmp_path), str(top)],
                              stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(holder.stdout.readline())
        assert theirs == top - 1  # the highest port below the range
        with socket.socket() as listener:  # a service outside dyn holds the next one
            listener.bind(("127.0.0.1", top - 2))
            listener.listen()
            assert claim_port("127.0.0.1", lock_dir=str(tmp_path), below=top) == top - 3
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert claim_port("127.0.0.1", lock_dir=str(tmp_path), below=top) == top - 1  # the dead one's is free


def test_no_port_left_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(port_claim, "NUM_PORTS", 2)
    top = _free_block()
    claim_port("127.0.0.1", lock_dir=str(tmp_path), below=top)
    claim_port("127.0.0.1", lock_dir=str(tmp_path), below=top)
    with pytest.raises(LaunchError, match=rf"no free port on 127.0.0.1 in {top - 2}..{top - 1}"):
        claim_port("127.0.0.1", lock_dir=str(tmp_path), below=top)
