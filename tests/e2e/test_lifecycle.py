"""Whole deployments over real sshd: `dyn up`, status, relaunch, `dyn down`, and bad inputs.

Every `dyn` here is the real CLI in a subprocess; workers run the mock
engine on two loopback sshd "hosts"; the daemon and the frontend run on
the local head node. Every process seen is checked dead by pid at the end,
and killed in `finally` if a test fails half way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from dyn.launch.local import pid_alive
from sshd import free_port, write_known_hosts

pytestmark = pytest.mark.e2e

DYN = str(Path(sys.executable).with_name("dyn"))
HEAD = """      - name: head
        address: local
        bind_address: 127.0.0.1
"""


def _host(name: str, h, known_hosts: str, identity: str | None = None, gpus: int = 2) -> str:
    fields = {"address": h.host, "port": h.port, "user": h.user, "identity_file": identity or h.client_key_path,
              "known_hosts": known_hosts, "bind_address": "127.0.0.1", "gpus": gpus, "gpu_model": "TEST-GPU",
              "gpu_memory_gib": 80}
    return f"      - name: {name}\n" + "".join(f"        {k}: {v}\n" for k, v in fields.items())


def _topology(tmp: Path, nodes: str) -> str:
    path = tmp / "topology.yaml"
    path.write_text(f"name: e2e\nhead: head\nracks:\n  - name: r0\n    nodes:\n{nodes}")
    return str(path)


def _recipe(tmp: Path, port: int, name: str = "e2e-mock") -> str:
    path = tmp / "recipe.yaml"
    path.write_text(f"""name: {name}
model: {{engine: mock, name: mock-llama}}
mode: disaggregated
workers:
  prefill: {{replicas: 2}}
  decode: {{replicas: 2}}
frontend: {{host: 127.0.0.1, port: {port}}}
shuttle: {{max_inflight_mib: 4}}
""")
    return str(path)


class Cli:
    def __init__(self, tmp: Path) -> None:
        self.env = {**os.environ, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes"),
                    "DYN_TIMEOUTS": "register_s=60,load_s=60,heartbeat_s=5,stop_s=10"}
        self.pids: set[int] = set()

    def __call__(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self, name: str) -> dict:
        result = self("status", "--name", name, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        self.pids.update(w["pid"] for w in payload["workers"] if w.get("pid"))
        if payload.get("daemon", {}).get("pid"):
            self.pids.add(payload["daemon"]["pid"])
        return payload

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_up_status_relaunch_garbage_down(sshd_hosts, tmp_path):
    hosts = sshd_hosts(2)
    known = write_known_hosts(tmp_path / "known_hosts", hosts)
    topology = _topology(tmp_path, HEAD + _host("tray1", hosts[0], known) + _host("tray2", hosts[1], known))
    recipe = _recipe(tmp_path, free_port())
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", topology, "-r", recipe, "--dyn-command", DYN)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ready" in up.stdout and "http://127.0.0.1:" in up.stdout

        status = cli.status("e2e-mock")
        assert status["state"] == "running"
        by_id = {w["id"]: w for w in status["workers"]}
        assert by_id["frontend"]["node"] == "head"
        assert sorted(w["role"] for w in status["workers"]) == ["decode", "decode", "frontend", "prefill", "prefill"]
        assert {w["node"] for w in status["workers"] if w["role"] != "frontend"} <= {"tray1", "tray2"}
        assert all(w["state"] == "ready" and pid_alive(w["pid"]) for w in status["workers"])

        again = cli("up", "-t", topology, "-r", recipe, "--dyn-command", DYN)
        assert again.returncode == 0 and "already running" in again.stdout
        assert {w["pid"] for w in cli.status("e2e-mock")["workers"]} == {w["pid"] for w in status["workers"]}

        changed = Path(recipe).read_text().replace("decode: {replicas: 2}", "decode: {replicas: 1}")
        changed_path = tmp_path / "changed.yaml"
        changed_path.write_text(changed)
        refused = cli("up", "-t", topology, "-r", str(changed_path), "--name", "e2e-mock", "--dyn-command", DYN)
        assert refused.returncode != 0 and "changed" in refused.stderr and "-y" in refused.stderr

        remote = next(w for w in status["workers"] if w["node"] == "tray2")
        logs = cli("logs", "--name", "e2e-mock", remote["id"], "-n", "50")
        assert logs.returncode == 0 and f"worker {remote['id']} ready" in logs.stdout
        missing = cli("logs", "--name", "e2e-mock", "decode-9")
        assert missing.returncode != 0 and "no process 'decode-9'" in missing.stderr

        _garbage_and_wrong_key(tmp_path, status["daemon"]["address"])
        assert cli.status("e2e-mock")["daemon"]["bad_messages"] >= 3

        victim = next(w for w in status["workers"] if w["role"] == "decode")
        os.kill(victim["pid"], signal.SIGKILL)

        def relaunched():
            w = {w["id"]: w for w in cli.status("e2e-mock")["workers"]}[victim["id"]]
            return w if w["state"] == "ready" and w["pid"] != victim["pid"] and w["restarts"] == 1 else None
        fresh = _wait(relaunched, 40, f"{victim['id']} relaunched and ready")
        assert fresh["node"] == victim["node"] and fresh["gpus"] == victim["gpus"] and fresh["gpus"]

        seen = set(cli.pids)
        down = cli("down", "--name", "e2e-mock")
        assert down.returncode == 0, down.stderr
        assert "stopped" in down.stdout
        assert [p for p in seen if pid_alive(p)] == []
        run_dir = tmp_path / "nodes" / "e2e-mock" / "run"
        assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".log")) == []  # no secrets left
        second = cli("down", "--name", "e2e-mock")
        assert second.returncode == 0 and "nothing is running" in second.stdout
        assert cli("ls").stdout.strip() == "no deployments"
    finally:
        cli.kill_all()


def _garbage_and_wrong_key(tmp_path: Path, address: str) -> None:
    """Random bytes, malformed msgpack and a stranger's CURVE key must not hurt the daemon."""
    from dyn.control.keys import DeploymentKeys, write_private
    from dyn.control.messages import CONTROL_CODEC, Register

    keys = json.loads((tmp_path / "state" / "e2e-mock" / "keys.json").read_text())
    ctx = zmq.Context()
    try:
        good = ctx.socket(zmq.DEALER)
        cli_public, cli_secret = keys["clients"]["cli"]
        good.curve_serverkey, good.curve_publickey = keys["server_public"].encode(), cli_public.encode()
        good.curve_secretkey = cli_secret.encode()
        good.linger = 0
        good.connect(address)
        for frame in (os.urandom(100), msgpack.packb([1, "register", {"process_id": 7}]), b"\xc1",
                      msgpack.packb({"not": "a frame"})):
            good.send(frame)
        good.send_multipart([b"extra", b"frames"])

        stranger_keys = DeploymentKeys.generate(["decode-0"])
        stranger = ctx.socket(zmq.DEALER)
        stranger.identity = b"decode-0"
        stranger.curve_serverkey = keys["server_public"].encode()
        pub, sec = stranger_keys.clients["decode-0"]
        stranger.curve_publickey, stranger.curve_secretkey = pub.encode(), sec.encode()
        stranger.linger = 0
        stranger.connect(address)
        stranger.send(CONTROL_CODEC.encode(Register("decode-0", "decode", "evil", 1, "0.1.0")), zmq.NOBLOCK)
        assert stranger.poll(1500) == 0  # never admitted, never answered
        del write_private
    finally:
        ctx.destroy(linger=0)


def test_unreachable_nodes_fail_up_front_and_nothing_runs(sshd_hosts, tmp_path):
    hosts = sshd_hosts(2)
    known = write_known_hosts(tmp_path / "known_hosts", hosts[:1])  # tray2's host key is unknown
    wrong_key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True)
    dead_port = free_port()

    class Dead:
        host, port, user, client_key_path = "127.0.0.1", dead_port, hosts[0].user, hosts[0].client_key_path

    nodes = (HEAD + _host("tray1", hosts[0], known, identity=str(wrong_key), gpus=1)
             + _host("tray2", hosts[1], known, gpus=1) + _host("tray3", Dead, known, gpus=1))
    topology = _topology(tmp_path, nodes)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(f"""name: e2e-bad
model: {{engine: mock}}
mode: disaggregated
workers:
  prefill: {{replicas: 1}}
  decode: {{replicas: 2}}
frontend: {{host: 127.0.0.1, port: {free_port()}}}
shuttle: {{max_inflight_mib: 4}}
""")
    cli = Cli(tmp_path)
    result = cli("up", "-t", topology, "-r", str(recipe_path), "--dyn-command", DYN)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "nothing was started" in out
    for node in ("tray1", "tray2", "tray3"):
        assert node in out, out
    assert not (tmp_path / "state" / "e2e-bad" / "deployment.json").exists()
    assert cli("ls").stdout.strip() == "no deployments"
    procs = subprocess.run(["pgrep", "-f", str(tmp_path / "nodes")], capture_output=True, text=True).stdout
    assert procs.strip() == ""


def test_default_files_with_the_torch_engine(tmp_path):
    root = Path(__file__).resolve().parents[2]
    recipe_text = (root / "recipes" / "tiny-local.yaml").read_text()
    port = free_port()
    recipe_text = recipe_text.replace("port: 8000", f"port: {port}").replace(
        "~/.cache/dyn/models/tiny-llama", str(tmp_path / "tiny-llama"))
    recipe = tmp_path / "tiny-local.yaml"
    recipe.write_text(recipe_text)
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", str(root / "topologies" / "local.yaml"), "-r", str(recipe), timeout=150)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (tmp_path / "tiny-llama" / "config.json").exists()
        status = cli.status("tiny-local")
        assert status["state"] == "running" and status["frontend_url"] == f"http://127.0.0.1:{port}"
        assert {w["role"] for w in status["workers"]} == {"frontend", "prefill", "decode"}
        os.kill(status["daemon"]["pid"], signal.SIGKILL)  # daemon gone: down works from the state file
        down = cli("down")
        assert down.returncode == 0, down.stderr
        assert "killed 3 leftover processes" in down.stdout
        assert [p for p in cli.pids if pid_alive(p)] == []
    finally:
        cli.kill_all()


@pytest.mark.parametrize("fault", ["truncated", "stalled"])
def test_a_worker_that_cannot_load_fails_up_with_its_log_and_nothing_runs(tmp_path, fault):
    """A broken checkpoint (the load raises) or one on a stalled file system (a FIFO: the read never
    returns, the load deadline passes): `dyn up` names the worker and shows the end of its own log (the
    operator should not have to go find it), then stops everything it started."""
    from dyn.engine.tiny import write_tiny_checkpoint

    root = Path(__file__).resolve().parents[2]
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny-llama", seed=0)
    weights = Path(checkpoint) / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
        os.mkfifo(weights)  # no writer: open() blocks for good
    recipe = tmp_path / "broken.yaml"
    recipe.write_text((root / "recipes" / "tiny-local.yaml").read_text()
                      .replace("name: tiny-local", "name: e2e-broken").replace("port: 8000", f"port: {free_port()}")
                      .replace("~/.cache/dyn/models/tiny-llama", str(checkpoint)))
    cli = Cli(tmp_path)
    cli.env["DYN_TIMEOUTS"] = "register_s=30,load_s=8,heartbeat_s=5,stop_s=10"
    try:
        up = cli("up", "-t", str(root / "topologies" / "local.yaml"), "-r", str(recipe), timeout=150)
        out = up.stdout + up.stderr
        assert up.returncode != 0, out
        assert "failed to come up (everything it started was stopped)" in out, out
        reports = out.split("\n[local / ")[1:]
        assert reports, out
        for report in reports:
            worker = report.split("]", 1)[0]
            assert worker in ("prefill-0", "decode-0"), out
            reason, tail = report.split("\n--- last log lines ---\n", 1)
            if fault == "truncated":
                assert "invalid header length" in reason and f'"process": "{worker}"' in tail, out
            else:  # where it hung: the thread reading the weights, not the idle event loop
                assert "did not become ready within 8 s" in reason, out
                assert "(most recent call first)" in tail and "dyn/weights/" in tail, out
                assert "were waiting for work" in tail, out
        assert cli("ls").stdout.strip() == "no deployments"
        procs = subprocess.run(["pgrep", "-f", str(tmp_path / "nodes")], capture_output=True, text=True).stdout
        assert procs.strip() == ""
    finally:
        cli.kill_all()
