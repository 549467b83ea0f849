"""`dyn up --wait` on a local mock deployment: holds, restarts a killed daemon, SIGTERM takes it down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sshd import free_port

DYN = str(Path(sys.executable).with_name("dyn"))
ROOT = Path(__file__).resolve().parents[2]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_wait_holds_restarts_the_daemon_and_sigterm_takes_it_down(tmp_path):
    recipe = tmp_path / "mock.yaml"
    recipe.write_text((ROOT / "recipes" / "mock-local.yaml").read_text()
                      .replace("port: 8000", f"port: {free_port()}").replace("enabled: true", "enabled: false")
                      .replace("replicas: 2", "replicas: 1"))
    env = {**os.environ, "DYN_STATE_DIR": str(tmp_path / "state"), "DYN_NODE_STATE_DIR": str(tmp_path / "nodes")}
    out = tmp_path / "up.out"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([DYN, "up", "-t", "local", "-r", str(recipe), "--name", "held", "--wait"], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "ready in" in out.read_text(), 90, "the deployment to come up")
        assert proc.poll() is None  # still holding
        status = lambda: json.loads(subprocess.run([DYN, "status", "--name", "held", "--json"], env=env,  # noqa: E731
                                                   capture_output=True, text=True, timeout=30).stdout or "{}")
        first = status()
        os.kill(first["daemon"]["pid"], signal.SIGKILL)  # --wait starts a new daemon that adopts the workers
        again = _wait_for(lambda: (s := status()).get("daemon", {}).get("pid") not in (None, first["daemon"]["pid"])
                          and s.get("state") == "running" and s, 30, "a new daemon")
        assert {w["id"]: w["pid"] for w in again["workers"]} == {w["id"]: w["pid"] for w in first["workers"]}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        text = out.read_text()
        assert "stopped (stop requested: drained and removed); daemon restarted 1x" in text, text
        assert not (tmp_path / "state" / "held" / "deployment.json").exists()
        for w in again["workers"]:
            assert not Path(f"/proc/{w['pid']}").exists() or \
                Path(f"/proc/{w['pid']}/stat").read_text().split(") ")[1][0] == "Z"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        subprocess.run([DYN, "down", "--name", "held", "--force"], env=env, capture_output=True, timeout=60)


def _stopped_deployment(tmp_path, monkeypatch):
    """A deployment's state as a daemon leaves it after stopping everything and exiting."""
    from dyn.planner.state import Snapshot, StateStore

    monkeypatch.setenv("DYN_STATE_DIR", str(tmp_path / "state"))
    store = StateStore("held")
    store.dir.mkdir(parents=True)
    store.deployment_path.write_text("{}")
    store.save_snapshot(Snapshot(None, "stopped"))
    return store


def test_wait_returns_down_when_dyn_down_removes_the_state_after_the_daemon_exited(tmp_path, monkeypatch):
    # `dyn down` removes the state only after its clean-up (Slurm steps): a poll in that gap saw a
    # stopped daemon and called the deployment ended (exit 1), which failed test_slurm once.
    import threading

    from dyn.deploy.hold import hold

    store = _stopped_deployment(tmp_path, monkeypatch)
    threading.Timer(0.5, store.remove).start()
    result = hold("held", threading.Event(), poll_s=0.05)
    assert (result.how, result.detail) == ("down", "removed by `dyn down`")


def test_wait_calls_a_stopped_deployment_ended_when_its_state_stays(tmp_path, monkeypatch):
    import threading

    from dyn.deploy.hold import hold

    _stopped_deployment(tmp_path, monkeypatch)
    result = hold("held", threading.Event(), poll_s=0.05, down_timeout_s=0.5)
    assert result.how == "ended" and "phase stopped" in result.detail
