"""`dyn down --force` after the daemon died: every process it launched is killed, counted once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dyn.deploy.teardown import down_async
from dyn.launch.local import pid_alive
from dyn.planner.state import Deployment, ProcessRecord, Snapshot, StateStore

ROOT = Path(__file__).resolve().parents[2]


def _process(*config_paths: Path) -> subprocess.Popen:
    """A stand-in for a launched worker: its command line names its configs, as `dyn worker` does."""
    configs = [arg for path in config_paths for arg in ("--config", str(path))]
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *configs],
                            start_new_session=True)


def _record(slot: str, pid: int, config: Path) -> ProcessRecord:
    return ProcessRecord(slot, "both", "local", (), pid, str(config.parent), str(config.with_suffix(".log")),
                         str(config), state="ready")


def test_force_down_kills_a_host_of_several_workers_once_and_counts_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("DYN_STATE_DIR", str(tmp_path / "state"))
    configs = [tmp_path / f"worker-{i}.json" for i in range(3)]
    for config in configs:
        config.write_text("{}")
        config.with_suffix(".keys.json").write_text("{}")
    host = _process(configs[0], configs[1])  # model.mock_workers_per_process: 2 workers, one pid
    alone = _process(configs[2])
    try:
        store = StateStore("d")
        store.dir.mkdir(parents=True)
        store.save_deployment(Deployment(
            name="d", topology_text=(ROOT / "topologies" / "local.yaml").read_text(), recipe_text="",
            topology_source="local.yaml", recipe_source="r.yaml",
            config_hash="x", head="local", dyn_command=("dyn",), remote_dyn_command=("dyn",),
            frontend_url="http://127.0.0.1:1", created_at=time.time(), node_state_root=str(tmp_path / "nodes")))
        records = (_record("worker-0", host.pid, configs[0]), _record("worker-1", host.pid, configs[1]),
                   _record("worker-2", alone.pid, configs[2]))
        store.save_snapshot(Snapshot(daemon=None, phase="running", processes=records))

        result = asyncio.run(down_async("d", force=True))

        assert result.num_killed == 2  # processes, not the three workers they ran
        for proc in (host, alone):
            assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not any(path.exists() for c in configs for path in (c, c.with_suffix(".keys.json")))
        assert not store.exists()
    finally:
        for proc in (host, alone):
            if pid_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
