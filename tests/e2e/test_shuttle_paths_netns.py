"""Transport choice from the topology path, live (issue 18): a disaggregated tiny-torch deployment
over two namespace hosts, each with its own address and sshd.

    tray1: prefill-0, decode-0     (same host: shared memory)
    tray2: decode-1                (other host: NIXL when installed, else TCP)

`dyn status --json` must report that transport for each prefill->decode pair, and a
request through each pair must complete with its KV moved by exactly that transport
(the decode worker's shuttle_bytes.<transport> counter grows; nothing is recomputed).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from dyn.shuttle.transports.nixl import is_available as nixl_available
from e2e_cluster import DYN, Cli, alive, wait_for, write_topology
from netns import NetnsLab, netns_unavailable
from sshd import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

RECIPE = """name: {name}
model: {{path: {model}, name: tiny-llama, engine: torch, device: cpu, dtype: float32,
        block_size: 16, max_context: 1024}}
mode: disaggregated
workers:
  prefill: {{replicas: 1, max_batch_size: 4, max_num_batched_tokens: 256, cpu_threads: 1}}
  decode: {{replicas: 2, max_batch_size: 4, max_num_batched_tokens: 256, cpu_threads: 1}}
router: {{policy: kv, disagg_threshold_tokens: 16, stall_timeout_s: 30}}  # a loaded CI's first NIXL pull
planner: {{enabled: false}}
frontend: {{host: 127.0.0.1, port: {port}}}
"""


def _cpu_node(name: str, address: str, port: int, user: str, identity: str, known_hosts: str) -> str:
    fields = {"address": address, "port": port, "user": user, "identity_file": identity,
              "known_hosts": known_hosts, "bind_address": address}
    return f"      - name: {name}\n" + "".join(f"        {k}: {v}\n" for k, v in fields.items())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dyn.engine.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    write_tiny_checkpoint(path, seed=0)
    return path


def _complete(url: str, prompt: list[int], max_tokens: int = 4) -> dict:
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _pull_warnings(log_path: str) -> list[str]:
    """The worker's own words for each failed pull (what to read when the assertion fails)."""
    try:
        return [line[:400] for line in Path(log_path).read_text().splitlines() if "KV pull failed" in line]
    except OSError as exc:
        return [f"log unreadable: {exc}"]


def test_status_reports_the_topology_transport_per_pair_and_the_kv_moves_by_it(tmp_path, model_dir):
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    cli = Cli(tmp_path)
    name = f"paths{free_port() % 10000}"
    with NetnsLab(tmp_path / "lab", 2) as lab:
        try:
            known = lab.write_known_hosts()
            nodes = "".join(_cpu_node(h.name, h.address, h.port, h.user, h.client_key, known) for h in lab.hosts)
            # The head holds a (test) GPU so that CPU workers are placed on the namespace hosts only.
            topology = Path(write_topology(tmp_path, nodes, head_bind=lab.head_address))
            topology.write_text(topology.read_text().replace(
                "        address: local\n", "        address: local\n        gpus: 1\n        gpu_model: TEST-GPU\n"
                "        gpu_memory_gib: 80\n", 1))
            port = free_port()
            recipe = tmp_path / "paths.yaml"
            recipe.write_text(RECIPE.format(name=name, model=model_dir, port=port))
            up = cli("up", "-t", str(topology), "-r", str(recipe), "--dyn-command", DYN, timeout=150)
            assert up.returncode == 0, up.stdout + up.stderr

            status = cli.status(name)
            node_of = {w["id"]: w["node"] for w in status["workers"] if w["role"] in ("prefill", "decode")}
            prefill = [w for w in node_of if w.startswith("prefill")]
            decode = [w for w in node_of if w.startswith("decode")]
            assert len(prefill) == 1 and len(decode) == 2, node_of
            assert set(node_of.values()) == {"tray1", "tray2"}, node_of
            cross = "nixl" if nixl_available() else "tcp"
            pairs = {(p["prefill"], p["decode"]): p for p in status["shuttle_paths"]["pairs"]}
            assert set(pairs) == {(prefill[0], d) for d in decode}, pairs
            expected = {}
            for (p, d), pair in pairs.items():
                same = node_of[p] == node_of[d]
                expected[d] = "shm" if same else cross
                assert (pair["transport"], pair["hop"], pair["link"]) == (
                    ("shm", "same_node", "host") if same else (cross, "cross_domain", "network")), pair
            assert sorted(expected.values()) == sorted(["shm", cross]), expected  # one pair of each kind

            # Prompts long enough for the prefill worker (3 blocks), distinct so nothing is cached, until
            # each decode worker has pulled KV; the KV router spreads them over both decode workers.
            url = f"http://127.0.0.1:{port}"
            sent = 0

            def pulled() -> dict[str, dict]:
                nonlocal sent
                out = _complete(url, [5 + (sent * 7 + i * 13) % 200 for i in range(48)])
                assert out["usage"]["completion_tokens"] == 4, out
                sent += 1
                workers = {w["id"]: w for w in cli.status(name)["workers"]}
                moved = {d: workers[d].get("shuttle", {}) for d in decode}
                return moved if all(m.get("bytes_by_transport", {}).get(expected[d], 0) > 0
                                    for d, m in moved.items()) else None
            moved = wait_for(pulled, 90, "KV pulled by both decode workers", period_s=0.1)
            logs = {w["id"]: w["log_path"] for w in cli.status(name)["workers"]}
            for d, used in moved.items():
                others = {t: b for t, b in used["bytes_by_transport"].items() if t != expected[d] and b}
                assert others == {}, (d, used)  # the topology's transport, and no other
                assert used["pulls"] >= 1 and used["pull_failures"] == 0 and used["local_fallbacks"] == 0, \
                    (d, used, _pull_warnings(logs[d]))
            text = cli("status", "--name", name).stdout
            assert all(f"{d} pulled: {expected[d]}" in text for d in decode), text

            down = cli("down", "--name", name)
            assert down.returncode == 0, down.stderr
            assert [p for p in cli.pids if alive(p)] == []
        finally:
            cli.kill_all()
