"""Two frontend replicas on one port (issue 18): SO_REUSEPORT spreads requests over both; a
SIGKILLed replica is relaunched by the daemon while the other keeps serving, a client that
retries loses nothing and its keep-alive connections spread back over both; KV routing through either replica sends a repeated prefix to the same worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from e2e_cluster import DYN, Cli, alive, http_get, wait_for
from sshd import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """name: replicas
model: {{engine: mock, name: mock-llama, block_size: 4, max_context: 4096,
        mock: {{decode_base_s: 0.002, decode_s_per_seq: 0.0001}}}}
mode: aggregated
workers:
  both: {{replicas: 2}}
router: {{policy: kv}}
frontend: {{host: 127.0.0.1, port: {port}, replicas: 2}}
"""


def _requests_served(replica_url: str) -> float:
    code, text = http_get(replica_url + "/metrics")
    assert code == 200, text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("dyn_frontend_requests_total{") and 'endpoint="/v1/completions"' in line)


def _complete(url: str, prompt: str, max_tokens: int = 4) -> dict:
    body = json.dumps({"model": "mock-llama", "prompt": prompt, "max_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # a new connection per request
        return json.loads(resp.read())


class RetryingClients:
    """Closed-loop openai clients (max_retries=5, as a careful client is configured)."""

    def __init__(self, url: str, concurrency: int = 4, max_tokens: int = 8) -> None:
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.ok: list[float] = []
        self.lost: list[str] = []
        self.short: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "RetryingClients":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        import openai

        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=5, timeout=30)
        try:
            await asyncio.gather(*(self._loop(client, i) for i in range(self.concurrency)))
        finally:
            await client.close()

    async def _loop(self, client, index: int) -> None:
        import openai

        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                out = await client.completions.create(model="mock-llama", prompt=f"client {index} turn {n} " * 4,
                                                      max_tokens=self.max_tokens, temperature=0,
                                                      extra_body={"ignore_eos": True})
            except openai.OpenAIError as exc:
                self.lost.append(f"{type(exc).__name__}: {exc}")
                continue
            if out.usage.completion_tokens != self.max_tokens:
                self.short.append(out.id)
            self.ok.append(time.monotonic())


def test_two_replicas_share_a_port_survive_sigkill_and_route_prefixes_alike(tmp_path):
    port = free_port()
    recipe = tmp_path / "replicas.yaml"
    recipe.write_text(RECIPE.format(port=port))
    url = f"http://127.0.0.1:{port}"
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", str(ROOT / "topologies" / "local.yaml"), "-r", str(recipe), "--dyn-command", DYN)
        assert up.returncode == 0, up.stdout + up.stderr
        status = cli.status("replicas")
        fronts = {f["id"]: f for f in status["frontends"]}
        assert set(fronts) == {"frontend", "frontend-1"} and status["frontend_urls"] == [url]
        assert all(f["url"] == url and f["state"] == "ready" for f in fronts.values())
        own = {fid: f["replica_url"] for fid, f in fronts.items()}
        assert len(set(own.values())) == 2 and url not in own.values()
        shown = cli("status", "--name", "replicas")
        assert "2 replicas" in shown.stdout, shown.stdout

        # 1. one address, two processes: the kernel deals new connections over both
        for i in range(40):
            _complete(url, f"spread {i}")
        served = {fid: _requests_served(u) for fid, u in own.items()}
        assert all(n >= 5 for n in served.values()) and sum(served.values()) >= 40, served

        # 2. KV routing: a prompt first served through one replica, repeated through the other,
        # goes to the worker that holds it (both replicas index the same workers' KV events)
        for i in range(4):
            prompt = f"shared system prompt number {i}: " + "lorem ipsum dolor sit amet " * 20
            first = _complete(own["frontend"], prompt)
            time.sleep(0.3)  # KV events reach both replicas' indexes
            again = _complete(own["frontend-1"], prompt)
            cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= first["usage"]["prompt_tokens"] - 8, (i, first["usage"], again["usage"])

        # 3. SIGKILL one replica under load: the other keeps serving, the daemon relaunches the
        # killed one, and clients that retry lose nothing
        victim = fronts["frontend-1"]["pid"]
        with RetryingClients(url) as clients:
            wait_for(lambda: len(clients.ok) >= 20, 30, "traffic to flow")
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

            def relaunched():
                fe = {f["id"]: f for f in cli.status("replicas")["frontends"]}["frontend-1"]
                return fe if fe["state"] == "ready" and fe["pid"] not in (victim, None) else None
            back = wait_for(relaunched, 60, "the killed replica relaunched")
            back_at = time.monotonic()
            during = [t for t in clients.ok if killed_at <= t <= back_at]
            assert len(during) >= 5, "the surviving replica stopped serving"
            done = len(clients.ok)
            wait_for(lambda: len(clients.ok) >= done + 20, 30, "traffic after the relaunch")
            # the clients' keep-alive connections all sit on the survivor now; it sheds those over
            # its share (Connection: close) and their reconnects reach the relaunched replica too
            wait_for(lambda: _requests_served(back["replica_url"]) >= 5, 30,
                     "the keep-alive clients to reach the relaunched replica")
        assert clients.lost == [] and clients.short == [], (clients.lost[:3], clients.short[:3])
        assert alive(fronts["frontend"]["pid"])  # the other replica was never touched
        before = _requests_served(back["replica_url"])
        for i in range(30):
            _complete(url, f"after {i}")
        assert _requests_served(back["replica_url"]) > before  # the new replica takes its share
        down = cli("down", "--name", "replicas")
        assert down.returncode == 0, down.stderr
    finally:
        cli.kill_all()


def test_a_deployment_without_curve_answers_the_cli(tmp_path):
    """auth.curve: false: the daemon listens without CURVE, so the CLI must not offer a handshake
    (it used to wait forever for `dyn up` to see the deployment ready)."""
    port = free_port()
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(RECIPE.format(port=port).replace("name: replicas", "name: plain")
                      .replace("replicas: 2}", "replicas: 1}") + "auth: {curve: false}\n")
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", str(ROOT / "topologies" / "local.yaml"), "-r", str(recipe), "--dyn-command", DYN,
                 timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        status = cli.status("plain")
        assert status["state"] == "running" and {f["id"] for f in status["frontends"]} == {"frontend"}
        assert _complete(f"http://127.0.0.1:{port}", "hello")["usage"]["completion_tokens"] == 4
        down = cli("down", "--name", "plain")
        assert down.returncode == 0, down.stderr
    finally:
        cli.kill_all()


def test_port_0_the_cli_shows_and_uses_the_port_the_frontend_took(tmp_path):
    """frontend.port: 0 asks for any free port: `dyn up`, `dyn ls`, `dyn status` and `dyn bench`
    name the port the frontend took (`dyn up` and `ls` printed http://...:0, which bench then used)."""
    recipe = tmp_path / "anyport.yaml"
    recipe.write_text(RECIPE.format(port=0).replace("name: replicas", "name: anyport")
                      .replace("replicas: 2}", "replicas: 1}"))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i * 10, "input_length": 1024, "output_length": 4,
                                         "hash_ids": [1, 2 + i]}) + "\n" for i in range(3)))
    cli = Cli(tmp_path)
    try:
        up = cli("up", "-t", str(ROOT / "topologies" / "local.yaml"), "-r", str(recipe), "--dyn-command", DYN,
                 timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        url = cli.status("anyport")["frontend_url"]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0"), url
        assert up.stdout.strip().endswith(f"Frontend: {url}"), up.stdout
        assert [row["frontend_url"] for row in json.loads(cli("ls", "--json").stdout)] == [url]
        assert _complete(url, "hello")["usage"]["completion_tokens"] == 4
        bench = cli("bench", "--name", "anyport", "--trace", str(trace), "--block-tokens", "16", "--speedup", "10", "--json", timeout=60)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        report = json.loads(bench.stdout)
        assert report["completed"] == 3 and report["failed"] == 0, report
        down = cli("down", "--name", "anyport")
        assert down.returncode == 0, down.stderr
    finally:
        cli.kill_all()
