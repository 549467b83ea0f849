"""The SLO planner acting on a live mock deployment over real sshd (issue 7).

Three GPUs on two loopback sshd "hosts": one prefill and one decode worker to
start, room for one more. The mock engine's timing model (also the planner's
profile) makes decode slow per sequence and prefill slow per token, so:

  * long outputs (a load step)    -> the planner launches decode-1, which registers and serves;
  * long prompts, short outputs   -> a decode worker flips to prefill in place (same pid);
  * a trickle (the load drops)    -> one prefill worker is drained and stopped.

Every admitted completion must succeed with exactly max_tokens tokens; while
the flip is pending, admission control may turn requests away (429, counted),
and once the load has dropped nothing is turned away, drain included.
"""

from __future__ import annotations

import time

import pytest

from e2e_cluster import (DYN, Cli, Traffic, alive, host_entry, http_get, start_traffic, stop_traffic, wait_for,
                         write_topology)
from sshd import free_port, write_known_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

RECIPE = """name: planner-live
model:
  name: mock-llama
  engine: mock
  block_size: 4
  mock: {{prefill_base_s: 0.002, prefill_s_per_token: 0.002, decode_base_s: 0.02, decode_s_per_seq: 0.02}}
mode: disaggregated
workers:
  prefill: {{replicas: 1, max_batch_size: 8, max_num_batched_tokens: 256}}
  decode: {{replicas: 1, max_batch_size: 8, max_num_batched_tokens: 256}}
router: {{disagg_threshold_tokens: 64}}
planner: {{enabled: true, ttft_ms: 1000, itl_ms: 100, min_prefill: 1, max_prefill: 2, min_decode: 1,
          max_decode: 2, interval_s: 2, cooldown_s: 4}}
frontend: {{host: 127.0.0.1, port: {port}}}
shuttle: {{max_inflight_mib: 4}}
"""


def test_load_step_launches_flip_moves_and_drop_drains(sshd_hosts, tmp_path):
    hosts = sshd_hosts(2)
    known = write_known_hosts(tmp_path / "known_hosts", hosts)
    nodes = "".join(host_entry(f"tray{i + 1}", h.host, h.port, h.user, h.client_key_path, known, gpus=gpus)
                    for i, (h, gpus) in enumerate(zip(hosts, (2, 1))))
    topology = write_topology(tmp_path, nodes)
    port = free_port()
    recipe = tmp_path / "planner-live.yaml"
    recipe.write_text(RECIPE.format(port=port))
    cli = Cli(tmp_path)
    traffic = Traffic(f"http://127.0.0.1:{port}", concurrency=6, shape=(10, 40))
    handle = None
    try:
        up = cli("up", "-t", topology, "-r", str(recipe), "--dyn-command", DYN)
        assert up.returncode == 0, up.stdout + up.stderr
        first = cli.status("planner-live")
        assert first["planner"]["enabled"] and "mock engine's timing model" in first["planner"]["policy"]
        initial = {w["id"]: w for w in first["workers"]}
        assert sorted(initial) == ["decode-0", "frontend", "prefill-0"]

        # 1. load step: long outputs need a second decode worker (ITL target)
        handle = start_traffic(traffic)

        def new_decode_serving():
            status = cli.status("planner-live")
            fresh = [w for w in status["workers"] if w["id"] not in initial and w["role"] == "decode"]
            return fresh[0] if fresh and fresh[0]["state"] == "ready" and fresh[0].get("requests_total", 0) > 0 \
                else None
        added = wait_for(new_decode_serving, 60, "the planner to launch a decode worker that serves traffic")
        assert added["id"] == "decode-1" and added["node"] in ("tray1", "tray2")
        status = cli.status("planner-live")
        decisions = status["decisions"]
        assert any(d["action"] == "scale_up" and d["role"] == "decode" and d["inputs"]["rate"] > 0
                   for d in decisions), decisions
        assert any(a["kind"] == "add" and a["worker"] == "decode-1" and a["outcome"] == "ok"
                   for a in status["planner"]["actions"])
        code, text = http_get(status["daemon"]["metrics_url"])
        assert code == 200 and 'dyn_planner_decisions_total{action="scale_up",deployment="planner-live",' \
                               'role="decode"}' in text, text[:2000]

        # 2. long prompts, short outputs: prefill needs a second worker; a decode worker flips
        decode_pids = {w["id"]: w["pid"] for w in status["workers"] if w["role"] == "decode"}
        traffic.shape = (10, 2)
        time.sleep(4)
        traffic.shape, traffic.active = (200, 2), 4

        def flipped():
            ws = cli.status("planner-live")["workers"]
            return [w for w in ws if w["id"] in decode_pids and w["role"] == "prefill"]
        (moved,) = wait_for(flipped, 60, "a decode worker to flip to prefill")
        assert moved["pid"] == decode_pids[moved["id"]] and moved["state"] == "ready"  # no relaunch
        status = cli.status("planner-live")
        assert sum(w["role"] == "prefill" for w in status["workers"]) == 2
        assert sum(w["role"] == "decode" for w in status["workers"]) == 1
        assert any(d["action"] == "flip" and d["role"] == "prefill" for d in status["decisions"])
        text = cli("status", "--name", "planner-live").stdout
        assert "flip" in text and "decisions" in text, text

        # 3. the load drops to a trickle: one prefill worker is drained and stopped, nothing lost
        traffic.shape, traffic.active = (100, 4), 1
        time.sleep(2)  # requests of phase 2 still queued may be turned away (429); from here on none
        drop = time.monotonic()
        # (read now, not with phase 2's status: under phase 2's load the planner may still have
        # changed the prefill set after that status was taken)
        prefill_now = {w["id"]: w["pid"] for w in cli.status("planner-live")["workers"] if w["role"] == "prefill"}

        def one_prefill_left():
            ws = cli.status("planner-live")["workers"]
            left = [w for w in ws if w["role"] == "prefill"]
            return left if len(left) == 1 else None
        def explain() -> dict:
            status = cli.status("planner-live")
            return {"prefill at the drop": prefill_now,
                    "workers": [(w["id"], w["role"], w["state"], w.get("num_running")) for w in status["workers"]],
                    "decisions": status["decisions"][-6:], "actions": status["planner"]["actions"][-6:],
                    "events": status["events"]}
        try:
            (kept,) = wait_for(one_prefill_left, 90, "the planner to drain and stop a prefill worker")
        except AssertionError:
            raise AssertionError(explain()) from None
        gone_ids = [wid for wid in prefill_now if wid != kept["id"]]
        assert len(gone_ids) == 1, explain()
        gone = gone_ids[0]
        wait_for(lambda: not alive(prefill_now[gone]), 15, f"{gone} (pid {prefill_now[gone]}) to exit")
        status = cli.status("planner-live")
        assert any(a["kind"] == "remove" and a["worker"] == gone and a["outcome"] == "ok"
                   for a in status["planner"]["actions"])
        assert any(f"{gone}: drained and stopped" in e for e in status["events"]), status["events"]
        time.sleep(2)  # a few more requests on the smaller deployment
        stop_traffic(handle)
        handle = None
        assert traffic.failures == [] and traffic.short == [], (traffic.failures[:5], traffic.short[:5])
        assert [t for t in traffic.rejected if t > drop] == []  # the drain turned nobody away
        assert traffic.ok > 20

        down = cli("down", "--name", "planner-live")
        assert down.returncode == 0, down.stderr
        assert [p for p in cli.pids if alive(p)] == []
    finally:
        if handle is not None:
            stop_traffic(handle)
        cli.kill_all()
