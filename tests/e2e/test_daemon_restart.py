"""Daemon and frontend failure on a live mock deployment over real sshd (issue 9).

* SIGKILL the planner daemon during traffic: no request fails; `dyn up` on the
  same files restarts it, and it adopts every process (same pids).
* SIGKILL the frontend: the daemon relaunches it on the same URL; requests that
  were in flight on it fail with a connection error, nothing else is lost.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from e2e_cluster import (DYN, Cli, Traffic, alive, host_entry, http_get, start_traffic, stop_traffic, wait_for,
                         write_topology)
from sshd import free_port, write_known_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

RECIPE = """name: restart
model: {{engine: mock, name: mock-llama, block_size: 4,
        mock: {{decode_base_s: 0.01, decode_s_per_seq: 0.001}}}}
mode: disaggregated
workers:
  prefill: {{replicas: 1}}
  decode: {{replicas: 1}}
router: {{disagg_threshold_tokens: 16}}
frontend: {{host: 127.0.0.1, port: {port}}}
shuttle: {{max_inflight_mib: 4}}
"""


def test_daemon_sigkill_then_up_adopts_and_frontend_is_relaunched(sshd_hosts, tmp_path):
    hosts = sshd_hosts(2)
    known = write_known_hosts(tmp_path / "known_hosts", hosts)
    nodes = "".join(host_entry(f"tray{i + 1}", h.host, h.port, h.user, h.client_key_path, known, gpus=1)
                    for i, h in enumerate(hosts))
    topology = write_topology(tmp_path, nodes)
    port = free_port()
    recipe = tmp_path / "restart.yaml"
    recipe.write_text(RECIPE.format(port=port))
    url = f"http://127.0.0.1:{port}"
    cli = Cli(tmp_path)
    traffic = Traffic(url, concurrency=3, shape=(40, 12))
    handle = None
    try:
        up = cli("up", "-t", topology, "-r", str(recipe), "--dyn-command", DYN)
        assert up.returncode == 0, up.stdout + up.stderr
        before = cli.status("restart")
        pids = {w["id"]: w["pid"] for w in before["workers"]}
        assert set(pids) == {"frontend", "prefill-0", "decode-0"} and before["planner"]["enabled"] is False
        handle = start_traffic(traffic)
        wait_for(lambda: traffic.ok >= 5, 30, "traffic to flow")

        # 1. the daemon dies: everything keeps serving
        old_daemon = before["daemon"]["pid"]
        os.kill(old_daemon, signal.SIGKILL)
        wait_for(lambda: not alive(old_daemon), 5, "the daemon to die")
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 5, 10, "requests to keep completing without the daemon")
        orphan = cli.status("restart")  # the last known state, from the snapshot on disk
        assert orphan["state"] == "unreachable" and "daemon" in orphan["error"], orphan["error"]

        # 2. `dyn up` with the same files restarts it; it adopts every process
        again = cli("up", "-t", topology, "-r", str(recipe), "--dyn-command", DYN)
        assert again.returncode == 0, again.stdout + again.stderr
        after = cli.status("restart")
        assert after["daemon"]["pid"] != old_daemon and alive(after["daemon"]["pid"])
        assert {w["id"]: w["pid"] for w in after["workers"]} == pids
        assert all(w["state"] == "ready" and w["restarts"] == 0 for w in after["workers"])
        assert sum("adopting pid" in e for e in after["events"]) == 3, after["events"]
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 5, 20, "traffic through the adopted deployment")
        assert traffic.failures == [] and traffic.rejected == [] and traffic.short == [], \
            (traffic.failures[:3], len(traffic.rejected), traffic.short[:3])
        # adoption is invisible to the frontend: no stream was failed over (nothing migrated or retried)
        code, metrics = http_get(url + "/metrics")
        moved = [ln for ln in metrics.splitlines() if ln.startswith(("dyn_requests_migrated_total",
                                                                      "dyn_frontend_retries_total"))]
        assert code == 200 and moved and all(float(ln.split()[-1]) == 0 for ln in moved), moved

        # 3. the frontend dies: the daemon relaunches it on the same URL
        killed_at = time.monotonic()
        os.kill(pids["frontend"], signal.SIGKILL)

        def frontend_back():
            status = cli.status("restart")
            fe = {w["id"]: w for w in status["workers"]}["frontend"]
            return fe if fe["state"] == "ready" and fe["pid"] != pids["frontend"] and \
                http_get(url + "/health")[0] == 200 else None
        fe = wait_for(frontend_back, 40, "the frontend relaunched and healthy")
        back_at = time.monotonic()
        assert fe["restarts"] == 1 and "gone" in fe["last_failure"]
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 5, 30, "traffic through the new frontend")
        # only requests in flight on the dead frontend (or sent while it was down) failed
        assert all(killed_at <= t <= back_at + 1 for t, _ in traffic.failures), traffic.failures
        assert all("Connection" in msg or "connect" in msg for _, msg in traffic.failures), traffic.failures
        workers_now = {w["id"]: w["pid"] for w in cli.status("restart")["workers"] if w["id"] != "frontend"}
        assert workers_now == {k: v for k, v in pids.items() if k != "frontend"}  # workers untouched
        stop_traffic(handle)
        handle = None
        assert traffic.short == []

        down = cli("down", "--name", "restart")
        assert down.returncode == 0, down.stderr
        assert [p for p in cli.pids if alive(p)] == []
    finally:
        if handle is not None:
            stop_traffic(handle)
        cli.kill_all()
