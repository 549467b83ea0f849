"""Where a starting worker looks for its weights (dyn.worker.weights.find_peers) per weights.source."""

from __future__ import annotations

import asyncio

from dyn.control.messages import CliReply
from dyn.worker import weights
from dyn.weights.fetch import Peer


class FakeDaemon:
    """Answers weight_peers from a script of payloads; records what it was asked."""

    def __init__(self, *payloads: dict) -> None:
        self.payloads = list(payloads)
        self.asked: list[dict] = []

    async def ask(self, action: str, args: dict, timeout_s: float) -> CliReply:
        assert action == "weight_peers"
        self.asked.append(args)
        return CliReply(ok=True, payload=self.payloads.pop(0) if len(self.payloads) > 1 else self.payloads[0])


PEER = {"process_id": "decode-0", "address": "tcp://10.0.0.1:7000", "transport": "tcp"}


def _find(daemon: FakeDaemon, source: str, wait_s: float = 5.0) -> list[Peer]:
    return asyncio.run(weights.find_peers(daemon.ask, process_id="decode-1", key="K", source=source, wait_s=wait_s))


def test_disk_never_asks_and_auto_takes_what_is_there():
    daemon = FakeDaemon({"peers": [PEER], "ahead": []})
    assert _find(daemon, "disk") == [] and daemon.asked == []
    assert _find(daemon, "auto") == [Peer("decode-0", "tcp://10.0.0.1:7000", "tcp")]
    assert daemon.asked == [{"process_id": "decode-1", "key": "K"}]
    assert _find(FakeDaemon({"peers": [], "ahead": ["decode-0"]}), "auto") == []  # auto never waits


def test_peer_waits_for_a_worker_still_loading_then_streams_from_it(monkeypatch):
    monkeypatch.setattr(weights, "PEER_WAIT_POLL_S", 0.01)
    daemon = FakeDaemon({"peers": [], "ahead": ["decode-0"]}, {"peers": [], "ahead": ["decode-0"]},
                        {"peers": [PEER], "ahead": []})
    assert _find(daemon, "peer") == [Peer("decode-0", "tcp://10.0.0.1:7000", "tcp")]
    assert len(daemon.asked) == 3
    # nobody ahead: the first worker of its weights reads the disk at once
    assert _find(FakeDaemon({"peers": [], "ahead": []}), "peer") == []
    # a worker ahead that never gets ready: give up at the deadline and read the disk
    stuck = FakeDaemon({"peers": [], "ahead": ["decode-0"]})
    assert _find(stuck, "peer", wait_s=0.05) == [] and len(stuck.asked) >= 2
