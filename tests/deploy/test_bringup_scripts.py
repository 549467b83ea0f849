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
    for address in ("dyn@10.10.0.11", "dyn@10.10.0.12"):
        assert f"{address}:/tmp/dyn-install.whl" in install.stdout and f"{address} set -e;" in install.stdout
    keys = _run("distribute-keys.sh", "-t", "hgx-h100x8", "--dry-run")
    assert keys.returncode == 0 and keys.stdout.count("+ ssh-copy-id") == 2 and keys.stdout.count("+ ssh-keyscan") == 2
    unit = _run("install-systemd-unit.sh", "--enable", "demo", "--dry-run")
    assert unit.returncode == 0 and "+ systemctl --user enable --now dyn-planner@demo" in unit.stdout
