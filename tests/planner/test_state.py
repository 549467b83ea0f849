import os
import stat

import pytest

from dyn.errors import DeploymentError
from dyn.planner.state import (DaemonRecord, Deployment, ProcessRecord, Snapshot, StateStore, check_name,
                               config_hash, list_deployments)


def _deployment(name="demo", digest="abc"):
    return Deployment(name=name, topology_text="t", recipe_text="r", topology_source="t.yaml",
                      recipe_source="r.yaml", config_hash=digest, head="h0", dyn_command=("/venv/bin/dyn",),
                      remote_dyn_command=("dyn",), frontend_url="http://127.0.0.1:8000", created_at=1.5,
                      router_policy="kv", timeouts={"heartbeat_s": 3.0})


def test_deployment_and_snapshot_round_trip(tmp_path):
    store = StateStore("demo", root=tmp_path)
    store.save_deployment(_deployment())
    assert store.load_deployment() == _deployment()
    snap = Snapshot(DaemonRecord("h0", 42, "tcp://127.0.0.1:5555", 2.0), "running",
                    (ProcessRecord("decode-0", "decode", "h1", (0, 1), 77, "/run", "/run/decode-0.log",
                                   "/run/decode-0.json", "ready", {"request": "tcp://x:1"}, 2),))
    store.save_snapshot(snap)
    assert store.load_snapshot() == snap
    assert stat.S_IMODE(os.stat(store.snapshot_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700


def test_list_and_remove(tmp_path):
    for name in ("b", "a"):
        StateStore(name, root=tmp_path).save_deployment(_deployment(name))
    (tmp_path / "junk").mkdir()
    assert list_deployments(tmp_path) == ["a", "b"]
    StateStore("a", root=tmp_path).daemon_log_path.write_text("last words\n")
    StateStore("a", root=tmp_path).remove()
    assert list_deployments(tmp_path) == ["b"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["daemon.log"]
    StateStore("a", root=tmp_path).remove()  # idempotent


def test_missing_and_corrupt_records_name_the_file(tmp_path):
    store = StateStore("demo", root=tmp_path)
    with pytest.raises(DeploymentError, match="no deployment named 'demo'"):
        store.load_deployment()
    store.dir.mkdir(parents=True)
    store.deployment_path.write_text("{not json")
    with pytest.raises(DeploymentError, match="deployment.json: not valid JSON"):
        store.load_deployment()
    store.snapshot_path.write_text('{"phase": "running"}')
    with pytest.raises(DeploymentError, match="malformed process snapshot"):
        store.load_snapshot()


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 64, "a b"])
def test_bad_names_are_refused(name):
    with pytest.raises(DeploymentError, match="bad deployment name"):
        check_name(name)


def test_hash_tracks_files_and_options():
    base = config_hash("t", "r", {"router": None})
    assert base == config_hash("t", "r", {"router": None})
    assert base != config_hash("t", "r2", {"router": None})
    assert base != config_hash("t2", "r", {"router": None})
    assert base != config_hash("t", "r", {"router": "random"})
