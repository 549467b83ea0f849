"""The rack bring-up scripts: --help works, --dry-run prints the commands for every node and runs none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", ["install-nodes.sh", "distribute-keys.sh", "install-systemd-unit.sh"])
def test_help(name):
    result = _run(name, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage:") and "--dry-run" in result.stdout


def test_dry_runs_name_every_node():
    install = _run("install-nodes.sh", "-t", "hgx-h100x8", "--dry-run", "--wheel", "/tmp/dyn.whl")
    assert install.returncode == 0, install.stderr
    for address in ("dyn@10.10.0.11", "dyn@10.10.0.12"):  # the wheel travels on the install's own ssh session
        command = next(line for line in install.stdout.splitlines() if f" {address} " in line)
        assert command.startswith("+ ssh ") and command.endswith("< /tmp/dyn.whl"), command
        assert 'cat > "$d/dyn.whl"' in command and '/bin/pip install -q \'torch==2.13.0\' "$d/dyn.whl"' in command
    keys = _run("distribute-keys.sh", "-t", "hgx-h100x8", "--dry-run")
    assert keys.returncode == 0 and keys.stdout.count("+ ssh-copy-id") == 2 and keys.stdout.count("+ ssh-keyscan") == 2
    unit = _run("install-systemd-unit.sh", "--enable", "demo", "--dry-run")
    assert unit.returncode == 0 and "+ systemctl --user enable --now dyn-planner@demo" in unit.stdout


def test_distribute_keys_on_a_real_node_records_its_host_key_and_keeps_a_working_key(sshd_hosts, tmp_path):
    """A head with no ~/.ssh yet: the node's host key lands in the topology's known_hosts (which did
    not exist), ssh-copy-id finds the key already authorized and changes nothing, and ssh then
    trusts the node with that file alone."""
    (node,) = sshd_hosts(1)
    known = tmp_path / "known_hosts"
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        "name: keys\nhead: head\nracks:\n  - name: r0\n    nodes:\n      - {name: head, address: local}\n"
        f"      - {{name: node1, address: {node.host}, port: {node.port}, user: {node.user}, "
        f"identity_file: {node.client_key_path}, known_hosts: {known}, gpus: 1, gpu_model: TEST, gpu_memory_gib: 80}}\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "HOME": str(home)}
    result = subprocess.run(["bash", str(SCRIPTS / "distribute-keys.sh"), "-t", str(topology)], capture_output=True,
                            text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert known.read_text().split()[1:] == node.host_key_pub.split()[:2]
    assert "Cannot stat" not in result.stderr
    login = subprocess.run(["ssh", "-p", str(node.port), "-i", node.client_key_path, "-o", "BatchMode=yes",
                            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                            f"{node.user}@{node.host}", "echo", "in"], capture_output=True, text=True, timeout=30)
    assert login.stdout.strip() == "in", login.stderr
