"""`dyn doctor` against real sshd hosts (several ports on loopback) plus the local head.

Each host gets its own environment through its authorized_keys line
(`environment="..."`, sshd started with PermitUserEnvironment=yes):
* host 0: PATH starts with a directory holding another `dyn` (prints dyn 0.0.9);
* host 1: DYN_DOCTOR_FS_ROOT points the probe at an empty tree, so the model
  files are missing there (the hosts share this machine's file system, so a
  test hook stands in for a node whose disk lacks the checkpoint);
* host 2: DYN_DOCTOR_CLOCK_OFFSET_S=60 (a test cannot move the machine's real
  clock; the probe adds the offset to the time it reports);
* the head: the recipe's frontend port is taken by a socket the test holds.
* node "gone": nothing listens on its port.
Each must come back as FAIL with a fix, the rest ok, and the exit status 1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from sshd import free_port, write_known_hosts

DYN = str(Path(sys.executable).with_name("dyn"))


def _give_env(handle, env: dict[str, str]) -> None:
    authorized = Path(handle.log_path).with_name("authorized_keys")
    key = authorized.read_text().strip()
    options = ",".join(f'environment="{k}={v}"' for k, v in env.items())
    authorized.write_text(f"{options} {key}\n")


def test_doctor_reports_each_broken_node_with_a_fix(sshd_hosts, tmp_path):
    hosts = sshd_hosts(3)
    known = write_known_hosts(tmp_path / "known_hosts", hosts)
    venv_bin = str(Path(sys.executable).parent)
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "dyn").write_text("#!/bin/sh\necho 'dyn 0.0.9'\n")
    (fake_bin / "dyn").chmod(0o755)
    path = f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"
    _give_env(hosts[0], {"PATH": f"{fake_bin}:{path}"})
    _give_env(hosts[1], {"PATH": path, "DYN_DOCTOR_FS_ROOT": str(tmp_path / "elsewhere")})
    _give_env(hosts[2], {"PATH": path, "DYN_DOCTOR_CLOCK_OFFSET_S": "60"})

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(os.urandom(3 << 20))
    port = free_port()
    nodes = "".join(f"      - {{name: host{i}, address: {h.host}, port: {h.port}, user: {h.user}, "
                    f"identity_file: {h.client_key_path}, known_hosts: {known}}}\n" for i, h in enumerate(hosts))
    topology = tmp_path / "topology.yaml"
    gone = f"      - {{name: gone, address: 127.0.0.1, port: {free_port()}, known_hosts: {known}}}\n"
    topology.write_text("name: doctor-test\nhead: head\nracks:\n  - name: r0\n    nodes:\n"
                        "      - {name: head, address: local}\n" + nodes + gone)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: doctor-test\nmodel: {{path: {model}, engine: torch, device: cpu}}\n"
                      f"workers: {{both: {{}}}}\nfrontend: {{host: 127.0.0.1, port: {port}}}\n")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        table = subprocess.run([DYN, "doctor", "-t", str(topology), "-r", str(recipe), "--dyn-command", "dyn"],
                               capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
        result = subprocess.run([DYN, "doctor", "-t", str(topology), "-r", str(recipe), "--dyn-command", "dyn",
                                 "--json"], capture_output=True, text=True, timeout=120)
    print(table.stdout)
    assert table.returncode == 1 and result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)
    by = {(f["node"], f["check"]): f for f in findings}
    failed = sorted((f["node"], f["check"]) for f in findings if f["result"] == "FAIL")
    assert failed == [("gone", "reachable"), ("head", f"port 127.0.0.1:{port}"), ("host0", "dyn version"),
                      ("host1", "model files"), ("host2", "clock")], failed
    assert "host unreachable" in by[("gone", "reachable")]["detail"] and "sshd" in by[("gone", "reachable")]["fix"]
    assert "0.0.9" in by[("host0", "dyn version")]["detail"] and "pip install dyn==" in by[("host0", "dyn version")]["fix"]
    assert "does not exist" in by[("host1", "model files")]["detail"] and "rsync" in by[("host1", "model files")]["fix"]
    assert by[("host2", "clock")]["detail"].startswith("+6") and "chrony" in by[("host2", "clock")]["fix"]
    assert "cannot bind" in by[("head", f"port 127.0.0.1:{port}")]["detail"]
    assert all(f["fix"] for f in findings if f["result"] == "FAIL")
    for node in ("head", "host0", "host1", "host2"):
        assert by[(node, "reachable")]["result"] == "ok"
        assert by[(node, "GPUs")]["detail"] == "skipped: no GPU"
    for node in ("head", "host0", "host2"):
        assert by[(node, "weights identical")]["result"] == "ok"
    for check in ("dyn version", "clock", "weights identical", "port 127.0.0.1"):
        assert check in table.stdout
