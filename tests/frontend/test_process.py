"""`dyn frontend --config F` and `dyn worker --config F` as real processes, driven by a stand-in daemon.

The daemon side is a minimal ROUTER that acks registrations and heartbeats
and pushes `update_workers` to the frontend, as the planner daemon does.
Everything else is the real thing: CURVE on both planes, the mock engine,
the openai client over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import zmq
import zmq.asyncio

from dyn.config.process import ProcessConfig
from dyn.control.keys import DeploymentKeys, write_private
from dyn.control.messages import CONTROL_CODEC, Command, Heartbeat, Register, RegisterAck
from dyn.control.sockets import Security, server_socket

RECIPE = """\
name: fe-test
model:
  engine: mock
  name: mock-llama
  block_size: 16
  max_context: 2048
  mock: {prefill_base_s: 0.0, prefill_s_per_token: 0.0, decode_base_s: 0.001, decode_s_per_seq: 0.0}
mode: aggregated
workers:
  both:
    replicas: 1
frontend:
  host: 127.0.0.1
  port: 8000
"""
TOPOLOGY = (Path(__file__).parents[2] / "topologies" / "local.yaml").read_text()
DYN = [sys.executable, "-c", "from dyn.cli.main import main; main()"]


class StandInDaemon:
    def __init__(self, security: Security) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = server_socket(self.ctx, zmq.ROUTER, "tcp://127.0.0.1:*", security)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.registered: dict[str, Register] = {}
        self.states: dict[str, Heartbeat] = {}

    async def serve(self) -> None:
        while True:
            ident, data = await self.sock.recv_multipart()
            msg = CONTROL_CODEC.decode(data)
            if isinstance(msg, Register):
                self.registered[msg.process_id] = msg
            elif isinstance(msg, Heartbeat):
                self.states[msg.process_id] = msg
            await self.sock.send_multipart([ident, CONTROL_CODEC.encode(RegisterAck(ok=True, heartbeat_interval_s=0.2))])
            if "frontend" in self.registered:
                await self.push_workers()

    async def push_workers(self) -> None:
        workers = [{"id": pid, "role": reg.role, "node": reg.node, "gpus": reg.gpus,
                    "state": self.states[pid].state if pid in self.states else "starting",
                    "addresses": reg.addresses, "metrics": self.states[pid].metrics if pid in self.states else {}}
                   for pid, reg in self.registered.items() if reg.role != "frontend"]
        await self.command("frontend", Command("update_workers", {"workers": workers}))

    async def command(self, process_id: str, command: Command) -> None:
        await self.sock.send_multipart([process_id.encode(), CONTROL_CODEC.encode(command)])

    def close(self, security: Security) -> None:
        self.sock.close(linger=0)
        security.stop()
        self.ctx.term()


async def _until(predicate, timeout_s: float, what: str, serve: asyncio.Task | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if serve is not None and serve.done():
            serve.result()  # the stand-in daemon crashed: show why
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def _config(tmp: Path, keys: DeploymentKeys, pid: str, role: str, daemon: str) -> Path:
    key_path = tmp / f"{pid}.keys.json"
    write_private(key_path, keys.for_process(pid).to_json())
    cfg = ProcessConfig(deployment="fe-test", process_id=pid, role=role, node="local", daemon_address=daemon,
                        recipe_text=RECIPE, topology_text=TOPOLOGY, keys_path=str(key_path), run_dir=str(tmp),
                        heartbeat_interval_s=0.2, daemon_grace_s=20.0, extra={"http_port": "0"})
    path = tmp / f"{pid}.json"
    path.write_text(cfg.to_json())
    return path


@pytest.mark.timeout(60)
def test_frontend_and_worker_processes_serve_openai_requests(tmp_path):
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp: Path) -> None:
    keys = DeploymentKeys.generate(["daemon", "frontend", "worker-0"])
    security = Security.from_keys(keys.for_process("daemon"))
    daemon = StandInDaemon(security)
    serve = asyncio.create_task(daemon.serve())
    procs: list[asyncio.subprocess.Process] = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    try:
        for pid, role in (("worker-0", "both"), ("frontend", "frontend")):
            log = open(tmp / f"{pid}.log", "wb")
            procs.append(await asyncio.create_subprocess_exec(
                *DYN, "worker" if role != "frontend" else "frontend", "--config",
                str(_config(tmp, keys, pid, role, daemon.address)), stdout=log, stderr=log, env=env))
        try:
            await _until(lambda: daemon.states.get("worker-0") and daemon.states["worker-0"].state == "ready"
                         and "frontend" in daemon.registered, 30, "worker ready and frontend registered")
        except AssertionError:
            logs = {p.name: p.read_text()[-2000:] for p in tmp.glob("*.log")}
            raise AssertionError(f"processes did not come up: {logs}") from None
        url = daemon.registered["frontend"].addresses["http"]
        assert daemon.registered["frontend"].addresses["metrics"] == url + "/metrics"
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10) as c:
            for _ in range(50):  # the first update_workers may still be on its way
                try:
                    await c.models.list()
                    out = await c.completions.create(model="mock-llama", prompt="hello", max_tokens=12,
                                                     temperature=0, extra_body={"ignore_eos": True})
                    break
                except openai.APIStatusError as exc:
                    assert exc.status_code == 503, exc
                    await asyncio.sleep(0.1)
            assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 5
            assert out.choices[0].finish_reason == "length" and len(out.choices[0].text) == 12
            stream = await c.chat.completions.create(model="mock-llama", max_tokens=6, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}],
                                                     stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            assert chunks[-1].usage.completion_tokens == 6
            again = await c.completions.create(model="mock-llama", prompt="hello", max_tokens=12,
                                               temperature=0, extra_body={"ignore_eos": True})
            assert again.choices[0].text == out.choices[0].text  # greedy: same tokens again
            await c.completions.create(model="mock-llama", prompt="x" * 40, max_tokens=2)
        # The worker's KV events reach the frontend's router index (2 full blocks of 16 tokens).
        indexed = 'dyn_router_indexed_blocks{tier="device",worker="worker-0"}'
        await _until(lambda: _metric(url, indexed) >= 2, 10, "KV events in the router index", serve)
        await _until(lambda: "frontend" in daemon.states and daemon.states["frontend"].metrics.get("requests_total", 0) >= 3, 5,
                     "frontend heartbeat with its request count", serve)
        for pid in ("frontend", "worker-0"):
            await daemon.command(pid, Command("stop"))
        try:
            codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 15)
        except TimeoutError:
            codes = [p.returncode for p in procs]
        assert codes == [0, 0], {p.name: p.read_text()[-1500:] for p in tmp.glob("*.log")}
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGKILL)
                await p.wait()
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        daemon.close(security)
