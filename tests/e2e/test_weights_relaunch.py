"""Fast replica start in a whole deployment: a relaunched worker streams its weights from a live peer.

The real CLI brings up two torch workers on this machine (both read the disk:
neither has a ready peer yet). worker-1 is SIGKILLed; the daemon relaunches it,
the relaunch asks the daemon for peers and pulls its weights from worker-0 over
shm, and serves the same greedy tokens as before. `dyn status` and the worker's
Prometheus endpoint both say where the weights came from and how long it took.
"""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
from openai import OpenAI

from e2e_cluster import Cli, wait_for
from sshd import free_port

pytestmark = pytest.mark.e2e


def _recipe(tmp, model_dir, port: int) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(f"""name: weights-peer
model: {{engine: torch, path: {model_dir}, name: tiny, dtype: float32, device: cpu, block_size: 4, max_context: 256}}
mode: aggregated
workers:
  both: {{replicas: 2, max_batch_size: 4, max_num_batched_tokens: 128, cpu_threads: 1}}
frontend: {{host: 127.0.0.1, port: {port}}}
weights: {{source: auto, peer_bandwidth_share: 0.5}}
""")
    return str(path)


def _completion(client: OpenAI) -> list[str]:
    out = client.completions.create(model="tiny", prompt="weights from a peer", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    return [out.choices[0].text]


@pytest.mark.timeout(240)
def test_relaunched_worker_loads_from_its_peer_and_serves_the_same_tokens(tmp_path):
    from dyn.engine.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path / "tiny", seed=3)
    port = free_port()
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", "local", "-r", _recipe(tmp_path, model_dir, port), timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        status = cli.status("weights-peer")
        first = {w["id"]: w for w in status["workers"] if w["role"] == "both"}
        assert {w["weights"]["source"] for w in first.values()} == {"disk"}
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
        before = [_completion(client) for _ in range(2)]

        old_pid = first["worker-1"]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def relaunched_ready():
            w = next(w for w in cli.status("weights-peer")["workers"] if w["id"] == "worker-1")
            return w if w["pid"] != old_pid and w["state"] == "ready" and w.get("weights") else None

        again = wait_for(relaunched_ready, 120, "worker-1 relaunched and ready")
        weights = again["weights"]
        assert (weights["source"], weights["peer"], weights["transport"]) == ("peer", "worker-0", "shm")
        assert weights["load_s"] > 0 and weights["ready_s"] >= weights["load_s"]
        text = cli("status", "--name", "weights-peer").stdout
        assert "peer worker-0 shm" in text and "disk" in text

        metrics = urllib.request.urlopen(again["addresses"]["metrics"], timeout=10).read().decode()
        assert 'dyn_worker_weights_load_seconds{' in metrics and 'source="peer"' in metrics
        assert 'dyn_worker_time_to_ready_seconds{' in metrics

        manifests = list((tmp_path / "nodes").rglob("weights/*.json"))
        assert len(manifests) == 1  # written once on this node, by the first worker to load
        # both workers serve, and the same greedy tokens as before the relaunch
        for _ in range(4):
            assert _completion(client) == before[0]
        down = cli("down", "--name", "weights-peer", timeout=60)
        assert down.returncode == 0, down.stderr
    finally:
        cli.kill_all()
