"""A node cut off by a network partition (issue 9), in real network namespaces.

Two worker nodes, each a namespace with its own veth, address and sshd; the
daemon and the frontend stay in the root namespace. During traffic, one
node's veth goes down: the daemon marks its worker failed after missed
heartbeats, the frontend migrates its requests to the other node, and when
the link returns the old process is killed over SSH and replaced (never
re-admitted), so no request is served twice. Every completion must arrive
whole: exactly max_tokens tokens, none lost, none duplicated.
"""

from __future__ import annotations

import re
import time

import pytest

from e2e_cluster import DYN, Cli, Traffic, alive, host_entry, http_get, start_traffic, stop_traffic, wait_for, \
    write_topology
from netns import NetnsLab, netns_unavailable
from sshd import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

RECIPE = """name: partition
model: {{engine: mock, name: mock-llama, block_size: 4,
        mock: {{decode_base_s: 0.03, decode_s_per_seq: 0.001}}}}
mode: aggregated
workers:
  both: {{replicas: 2}}
router: {{stall_timeout_s: 2.0, max_migrations: 3}}
frontend: {{host: 127.0.0.1, port: {port}}}
"""


def test_cut_node_migrates_its_requests_and_is_replaced_when_back(tmp_path):
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    cli = Cli(tmp_path, timeouts="register_s=60,load_s=60,heartbeat_s=3,stop_s=10,restart_backoff_s=0.5")
    handle = None
    with NetnsLab(tmp_path / "lab", 2) as lab:
        try:
            known = lab.write_known_hosts()
            nodes = "".join(host_entry(h.name, h.address, h.port, h.user, h.client_key, known, gpus=1,
                                       bind_address=h.address) for h in lab.hosts)
            topology = write_topology(tmp_path, nodes, head_bind=lab.head_address)
            port = free_port()
            recipe = tmp_path / "partition.yaml"
            recipe.write_text(RECIPE.format(port=port))
            url = f"http://127.0.0.1:{port}"
            up = cli("up", "-t", topology, "-r", str(recipe), "--dyn-command", DYN)
            assert up.returncode == 0, up.stdout + up.stderr
            status = cli.status("partition")
            victim = next(w for w in status["workers"] if w["node"] == "tray1")
            survivor = next(w for w in status["workers"] if w["node"] == "tray2")

            # Prompts distinct per request (a 10-character prompt is the same for every request of a
            # client, so KV routing could keep every client on one worker and leave the node to cut
            # idle); the cut comes while the victim reports requests running.
            traffic = Traffic(url, concurrency=4, shape=(40, 60))
            handle = start_traffic(traffic)
            wait_for(lambda: traffic.ok >= 4 and all(
                w.get("requests_total", 0) > 0 for w in cli.status("partition")["workers"] if w["role"] == "both"),
                30, "traffic on both nodes")
            wait_for(lambda: {w["id"]: w for w in cli.status("partition")["workers"]}[victim["id"]].get(
                "num_running", 0) > 0, 30, "requests running on the node to cut", period_s=0.1)

            lab.cut(0)
            cut_at = time.monotonic()

            def victim_failed():
                w = {w["id"]: w for w in cli.status("partition")["workers"]}[victim["id"]]
                return w if w["state"] in ("failed", "gave_up") else None
            failed = wait_for(victim_failed, 20, f"{victim['id']} declared failed")
            assert "missed heartbeats" in failed["last_failure"], failed
            detected_s = time.monotonic() - cut_at
            served = traffic.ok
            wait_for(lambda: traffic.ok >= served + 4, 30, "requests completing on the other node")
            assert alive(victim["pid"])  # cut off, not dead: it must never serve again
            held = {w["id"]: w for w in cli.status("partition")["workers"]}[victim["id"]]
            assert held["state"] == "failed" and held["pid"] == victim["pid"]  # not re-admitted, not replaced
            assert detected_s < 3 + 2 + 2  # heartbeat_s + one heartbeat + status polling

            lab.heal(0)

            def replaced():
                w = {w["id"]: w for w in cli.status("partition")["workers"]}[victim["id"]]
                return w if w["state"] == "ready" and w["pid"] != victim["pid"] else None
            fresh = wait_for(replaced, 60, f"{victim['id']} replaced after the link came back")
            assert fresh["node"] == "tray1" and fresh["restarts"] == 1
            wait_for(lambda: not alive(victim["pid"]), 10, "the cut-off process to be killed")
            served = traffic.ok
            wait_for(lambda: traffic.ok >= served + 4, 30, "traffic after the node rejoined")
            stop_traffic(handle)
            handle = None

            assert traffic.failures == [] and traffic.short == [], (traffic.failures[:3], traffic.short[:3])
            code, metrics = http_get(url + "/metrics")
            moved = sum(float(v) for v in re.findall(
                r"^(?:dyn_requests_migrated_total|dyn_frontend_retries_total)(?:\{[^}]*\})? (\S+)$", metrics, re.M))
            assert code == 200 and moved >= 1, [ln for ln in metrics.splitlines() if "migrat" in ln or "retr" in ln]
            final = cli.status("partition")
            assert {w["id"]: w["pid"] for w in final["workers"]}[survivor["id"]] == survivor["pid"]
            assert any(f"{victim['id']}: relaunching on tray1" in e for e in final["events"]), final["events"]
            down = cli("down", "--name", "partition")
            assert down.returncode == 0, down.stderr
            assert [p for p in cli.pids if alive(p)] == []
        finally:
            if handle is not None:
                stop_traffic(handle)
            cli.kill_all()
