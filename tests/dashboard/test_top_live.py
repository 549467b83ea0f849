"""`dyn top`, the metrics endpoints and `dyn logs --request` against a live mock deployment.

One deployment (daemon, frontend, 1 prefill + 2 decode mock workers, all
local subprocesses) serves every test in this module; it is taken down and
every pid it had is checked dead (and SIGKILLed if not) at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sshd import free_port

pytestmark = pytest.mark.e2e

DYN = str(Path(sys.executable).with_name("dyn"))
NAME = "top-live"


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.env = {**os.environ, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes"),
                    "DYN_TIMEOUTS": "register_s=60,load_s=60,heartbeat_s=10,stop_s=10", "COLUMNS": "160"}
        self.pids: set[int] = set()

    def dyn(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        result = self.dyn("status", "--name", NAME, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        self.pids.update(w["pid"] for w in payload["workers"] if w.get("pid"))
        self.pids.add(payload["daemon"]["pid"])
        return payload

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("top")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""name: {NAME}
model: {{engine: mock, name: mock-llama, mock: {{decode_base_s: 0.002, num_kv_blocks: 512}}}}
mode: disaggregated
workers:
  prefill: {{replicas: 1}}
  decode: {{replicas: 2}}
frontend: {{host: 127.0.0.1, port: {free_port()}}}
""")
    d = Deployment(tmp)
    try:
        up = d.dyn("up", "-t", "local", "-r", str(recipe), "--dyn-command", DYN, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        d.status()
        yield d
    finally:
        d.dyn("down", "--name", NAME, timeout=60)
        d.kill_all()


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _chat(url: str, n: int, request_id: str | None = None) -> list:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    headers = {"X-Request-Id": request_id} if request_id else None
    return [client.chat.completions.create(model="mock-llama", max_tokens=8, extra_headers=headers,
                                           messages=[{"role": "user", "content": f"hello {i} " * (40 + i)}])
            for i in range(n)]


def test_top_once_renders_every_worker_with_role_and_state(deployment):
    result = deployment.dyn("top", "--name", NAME, "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    payload = deployment.status()
    assert f"{NAME}  running" in out and f"ready {len(payload['workers'])}/{len(payload['workers'])}" in out
    assert "prefill (1)" in out and "decode (2)" in out and "frontend (1)" in out
    for w in payload["workers"]:
        rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] == [w["id"]]]
        assert [w["id"], w["node"], "-", "ready"] in [r[:4] for r in rows], f"{w['id']} missing from:\n{out}"
    assert "TTFT p50" in out and "/ 1000ms" in out  # recipe default target


def test_top_quits_on_q_in_tmux(deployment, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux (scripts/test.sh installs it)")
    session = f"dyntop{os.getpid()}"
    env = " ".join(f"{k}={v}" for k, v in deployment.env.items() if k.startswith("DYN_"))
    sock = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "150", "-y", "45",
                    f"env {env} {DYN} top --name {NAME} --interval 0.5"], check=True, timeout=10)
    try:
        screen = ""
        deadline = time.monotonic() + 30
        while "decode-1" not in screen and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True, timeout=10).stdout
        assert "decode-1" in screen and "prefill (1)" in screen, screen
        subprocess.run([*tmux, "send-keys", "-t", session, "Down", "Down", "Enter"], check=True, timeout=10)
        deadline = time.monotonic() + 15
        while "pid" not in screen.split("decode (2)")[-1] and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True, timeout=10).stdout
        assert "kv_usage=" in screen, screen  # the detail view of the selected worker
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = subprocess.run([*tmux, "has-session", "-t", session], capture_output=True, timeout=10)
            if alive.returncode != 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("dyn top did not quit on q within 10 s")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


def test_metrics_endpoints_parse_and_counters_move(deployment):
    payload = deployment.status()
    workers = {w["id"]: w for w in payload["workers"]}
    urls = {wid: w["addresses"]["metrics"] for wid, w in workers.items()}
    urls["daemon"] = payload["daemon"]["metrics_url"]
    before = {wid: _scrape(url) for wid, url in urls.items()}
    assert _total(before["decode-0"], "dyn_worker_kv_blocks_capacity") == 512
    assert _total(before["daemon"], "dyn_daemon_processes") == 4
    _chat(payload["frontend_url"], 4)
    after = {wid: _scrape(url) for wid, url in urls.items()}
    served = sum(_total(after[w], "dyn_worker_requests_total") - _total(before[w], "dyn_worker_requests_total")
                 for w in ("prefill-0", "decode-0", "decode-1"))
    assert served >= 4
    engines = ("prefill-0", "decode-0", "decode-1")
    generated = sum(_total(after[w], "dyn_worker_generated_tokens_total") for w in engines)
    assert generated > sum(_total(before[w], "dyn_worker_generated_tokens_total") for w in engines)
    assert _total(after["frontend"], "dyn_frontend_ttft_seconds_count") >= 4
    # The daemon counts control messages (heartbeats among them, one a second per process): the
    # chats may all finish between two heartbeats, so wait for the next one (bounded).
    control_before = _total(before["daemon"], "dyn_daemon_control_messages_total")
    deadline = time.monotonic() + 5
    while _total(after["daemon"], "dyn_daemon_control_messages_total") <= control_before \
            and time.monotonic() < deadline:
        time.sleep(0.2)
        after["daemon"] = _scrape(urls["daemon"])
    assert _total(after["daemon"], "dyn_daemon_control_messages_total") > control_before
    assert _total(after["decode-0"], "process_cpu_seconds_total") > 0


def test_logs_follow_a_response_id_to_the_workers(deployment):
    payload = deployment.status()
    response = _chat(payload["frontend_url"], 1)[0]
    time.sleep(0.3)
    result = deployment.dyn("logs", "--name", NAME, "--request", response.id)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    processes = {ln.split()[1] for ln in lines}
    assert processes <= {"frontend", "prefill-0", "decode-0", "decode-1"}, result.stdout
    assert "frontend" in processes and processes & {"decode-0", "decode-1"}, result.stdout
    finished = [ln for ln in lines if "request finished" in ln]
    assert any(ln.split()[1] == "frontend" for ln in finished), result.stdout
    missing = deployment.dyn("logs", "--name", NAME, "--request", "no-such-request")
    assert missing.returncode == 1 and "no line with request_id 'no-such-request'" in missing.stderr


def test_logs_follow_a_client_request_id_across_processes(deployment):
    payload = deployment.status()
    _chat(payload["frontend_url"], 1, request_id="client-trace-7")
    time.sleep(0.3)
    result = deployment.dyn("logs", "--name", NAME, "--request", "client-trace-7")
    assert result.returncode == 0, result.stdout + result.stderr
    processes = {line.split()[1] for line in result.stdout.splitlines()}
    assert "frontend" in processes and processes & {"prefill-0", "decode-0", "decode-1"}
