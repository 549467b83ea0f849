"""Helpers for whole-deployment tests: the real `dyn` CLI, topology/recipe files, traffic.

Every pid the tests see is remembered and SIGKILLed (with its process group)
in `Cli.kill_all`, which the tests call in `finally`. Traffic goes through the
official `openai` client; every completion is checked for its token count
(greedy, ignore_eos), so a lost or duplicated token is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dyn.launch.local import pid_alive as alive  # noqa: F401 (the e2e tests import it from here)

DYN = str(Path(sys.executable).with_name("dyn"))
HEAD = """      - name: head
        address: local
        bind_address: {bind}
"""


def host_entry(name: str, address: str, port: int, user: str, identity: str, known_hosts: str, *,
               gpus: int, bind_address: str = "127.0.0.1") -> str:
    fields = {"address": address, "port": port, "user": user, "identity_file": identity,
              "known_hosts": known_hosts, "bind_address": bind_address, "gpus": gpus, "gpu_model": "TEST-GPU",
              "gpu_memory_gib": 80}
    return f"      - name: {name}\n" + "".join(f"        {k}: {v}\n" for k, v in fields.items())


def write_topology(tmp: Path, nodes: str, head_bind: str = "127.0.0.1") -> str:
    path = tmp / "topology.yaml"
    path.write_text(f"name: e2e\nhead: head\nracks:\n  - name: r0\n    nodes:\n"
                    f"{HEAD.format(bind=head_bind)}{nodes}")
    return str(path)


class Cli:
    """The real CLI in a subprocess, with its state under the test's tmp dir."""

    def __init__(self, tmp: Path, timeouts: str = "register_s=60,load_s=60,heartbeat_s=5,stop_s=10") -> None:
        self.env = {**os.environ, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes"),
                    "DYN_TIMEOUTS": timeouts}
        self.pids: set[int] = set()

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self, name: str) -> dict:
        result = self("status", "--name", name, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        self.remember(payload)
        return payload

    def remember(self, payload: dict) -> None:
        self.pids.update(w["pid"] for w in payload.get("workers", ()) if w.get("pid"))
        if payload.get("daemon", {}).get("pid"):
            self.pids.add(payload["daemon"]["pid"])

    def kill_all(self) -> None:
        for pid in self.pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except OSError as exc:
        return 0, str(exc)


@dataclass
class Traffic:
    """Closed-loop clients: `concurrency` loops, each sending one completion after another."""

    base_url: str
    model: str = "mock-llama"
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    """(time.monotonic(), error) of every request that failed after it was admitted."""
    rejected: list[float] = field(default_factory=list)
    """time.monotonic() of each 429 (admission control turning a request away up front)."""
    short: list[str] = field(default_factory=list)
    """Completions with the wrong number of tokens (lost or duplicated output)."""
    shape: tuple[int, int] = (10, 8)
    """(prompt characters, max_tokens) of the next requests; change it to change the load."""
    concurrency: int = 4
    active: int | None = None
    """Loops that send (None: all); the others idle. Change it to change the load."""

    async def run(self, stop: asyncio.Event) -> None:
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        try:
            await asyncio.gather(*(self._loop(client, i, stop) for i in range(self.concurrency)))
        finally:
            await client.close()

    async def _loop(self, client, index: int, stop: asyncio.Event) -> None:
        import openai

        n = 0
        while not stop.is_set():
            if self.active is not None and index >= self.active:
                await asyncio.sleep(0.1)
                continue
            chars, max_tokens = self.shape
            prompt = (f"client {index} request {n} " + "x" * chars)[:max(chars, 1)]
            n += 1
            try:
                result = await client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0, extra_body={"ignore_eos": True})
            except openai.RateLimitError:
                self.rejected.append(time.monotonic())
                await asyncio.sleep(0.2)
                continue
            except Exception as exc:  # every failure is recorded and asserted on by the test
                self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(0.2)
                continue
            if result.usage is None or result.usage.completion_tokens != max_tokens:
                self.short.append(f"{prompt[:20]!r}: {result.usage}")
            self.ok += 1


def start_traffic(traffic: Traffic) -> tuple[asyncio.AbstractEventLoop, asyncio.Event, "object"]:
    """Run the traffic on its own event loop in a thread; stop with `stop_traffic`."""
    import threading

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    done = threading.Event()

    def main() -> None:
        try:
            loop.run_until_complete(traffic.run(stop))
        finally:
            done.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return loop, stop, (thread, done)


def stop_traffic(handle, timeout_s: float = 60.0) -> None:
    loop, stop, (thread, done) = handle
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout_s)
    assert not thread.is_alive(), "traffic did not stop"
    loop.close()
