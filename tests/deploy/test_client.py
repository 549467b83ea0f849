"""The CLI's line to the daemon: a daemon whose process is gone is reported at once, not at the deadline."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from dyn.deploy.client import DaemonUnreachable, request
from dyn.planner.state import DaemonRecord, Snapshot, StateStore

SILENT_DAEMON = """
import sys, time, zmq
sock = zmq.Context().socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
time.sleep(120)  # takes requests, answers none
"""


def _store_naming(tmp_path, monkeypatch, pid: int, address: str) -> StateStore:
    monkeypatch.setenv("DYN_STATE_DIR", str(tmp_path / "state"))
    store = StateStore("d")
    store.dir.mkdir(parents=True)
    store.save_snapshot(Snapshot(daemon=DaemonRecord("local", pid, address, time.time()), phase="running",
                                 processes=()))
    return store


def test_a_daemon_that_has_exited_is_unreachable_without_waiting_for_the_deadline(tmp_path, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = _store_naming(tmp_path, monkeypatch, gone.pid, "tcp://127.0.0.1:9")

    with pytest.raises(DaemonUnreachable, match=rf"is not running \(pid {gone.pid} has exited\)"):
        asyncio.run(asyncio.wait_for(request(store, "status", timeout_s=600), 30))


def test_a_daemon_that_dies_before_answering_is_unreachable_when_it_dies(tmp_path, monkeypatch):
    daemon = subprocess.Popen([sys.executable, "-c", SILENT_DAEMON], stdout=subprocess.PIPE, text=True)
    try:
        port = int(daemon.stdout.readline())
        store = _store_naming(tmp_path, monkeypatch, daemon.pid, f"tcp://127.0.0.1:{port}")

        async def ask_then_kill() -> None:
            asking = asyncio.ensure_future(request(store, "status", timeout_s=600))
            await asyncio.sleep(0.5)
            assert not asking.done()  # the request reached a live daemon that takes its time
            daemon.kill()
            daemon.wait()
            await asking

        with pytest.raises(DaemonUnreachable, match=rf"exited \(pid {daemon.pid}\) before answering 'status'"):
            asyncio.run(asyncio.wait_for(ask_then_kill(), 30))
    finally:
        daemon.kill()
        daemon.wait()
