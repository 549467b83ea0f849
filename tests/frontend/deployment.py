"""Real `dyn worker` / `dyn frontend` processes under a stand-in daemon, for failure tests.

The stand-in daemon acks registrations and heartbeats, pushes `update_workers`
to the frontend as the planner daemon does, notices a worker process exit
(by waiting on its pid), reports it "failed" and, with `relaunch=True`,
starts a replacement under a new id. Every process is killed by pid on exit.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import zmq
import zmq.asyncio

from dyn.config.process import ProcessConfig
from dyn.control.keys import DeploymentKeys, write_private
from dyn.control.messages import CONTROL_CODEC, Command, Heartbeat, Register, RegisterAck
from dyn.control.sockets import Security, server_socket
from dyn.worker.process_startup import remove_vllm_files_of_dead_workers

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = (ROOT / "topologies" / "local.yaml").read_text()
DYN = [sys.executable, "-c", "from dyn.cli.main import main; main()"]
_MAX_WORKERS = 16


class Deployment:
    def __init__(self, tmp: Path, recipe: str, roles: list[str], *, relaunch: bool = True,
                 ready_timeout_s: float = 60.0) -> None:
        self.tmp, self.recipe, self.roles, self.relaunch = tmp, recipe, roles, relaunch
        self.ready_timeout_s = ready_timeout_s
        ids = ["daemon", "frontend"] + [f"worker-{i}" for i in range(_MAX_WORKERS)]
        self.keys = DeploymentKeys.generate(ids)
        self.security = Security.from_keys(self.keys.for_process("daemon"))
        self.ctx = zmq.asyncio.Context()
        self.sock = server_socket(self.ctx, zmq.ROUTER, "tcp://127.0.0.1:*", self.security)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.registered: dict[str, Register] = {}
        self.heartbeats: dict[str, Heartbeat] = {}
        self.dead: set[str] = set()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.roles_of: dict[str, str] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Deployment":
        self._tasks.append(asyncio.create_task(self._serve()))
        try:
            for role in self.roles:
                await self._launch(f"worker-{next(self._ids)}", role)
            await self._launch("frontend", "frontend")
            await self.until(lambda: "frontend" in self.registered and self.num_ready() == len(self.roles),
                             self.ready_timeout_s, "workers ready and the frontend registered")
            await self.until(lambda: self._frontend_sees_ready() == len(self.roles), 10,
                             "the frontend to see every worker")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            await proc.wait()
        # What the SIGKILLed vLLM workers left (a worker starting on this node would remove it)
        remove_vllm_files_of_dead_workers(tempfile.gettempdir())
        self.sock.close(linger=0)
        self.security.stop()
        self.ctx.term()

    @property
    def url(self) -> str:
        return self.registered["frontend"].addresses["http"]

    def num_ready(self) -> int:
        return sum(1 for pid, hb in self.heartbeats.items()
                   if pid != "frontend" and pid not in self.dead and hb.state == "ready")

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    async def kill(self, worker_id: str) -> int:
        """SIGKILL a worker; the daemon reports it failed (and relaunches) when it sees the exit."""
        proc = self.procs[worker_id]
        proc.send_signal(signal.SIGKILL)
        return proc.pid

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    async def until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            await asyncio.sleep(0.05)

    async def push_workers(self) -> None:
        if "frontend" not in self.registered:
            return
        workers = []
        for pid, reg in self.registered.items():
            if reg.role == "frontend":
                continue
            hb = self.heartbeats.get(pid)
            state = "failed" if pid in self.dead else hb.state if hb else "starting"
            workers.append({"id": pid, "role": reg.role, "node": reg.node, "gpus": reg.gpus, "state": state,
                            "addresses": reg.addresses, "metrics": hb.metrics if hb else {}})
        await self.sock.send_multipart([b"frontend", CONTROL_CODEC.encode(
            Command("update_workers", {"workers": workers}))])

    def _frontend_sees_ready(self) -> int:
        try:
            workers = self.health()["workers"]
        except OSError:
            return 0
        return sum(1 for w in workers.values() if w["state"] == "ready")

    async def _serve(self) -> None:
        while True:
            ident, data = await self.sock.recv_multipart()
            msg = CONTROL_CODEC.decode(data)
            if isinstance(msg, Register):
                self.registered[msg.process_id] = msg
            elif isinstance(msg, Heartbeat):
                self.heartbeats[msg.process_id] = msg
            await self.sock.send_multipart([ident, CONTROL_CODEC.encode(
                RegisterAck(ok=True, heartbeat_interval_s=0.2))])
            await self.push_workers()

    async def _launch(self, pid: str, role: str) -> None:
        key_path = self.tmp / f"{pid}.keys.json"
        write_private(key_path, self.keys.for_process(pid).to_json())
        cfg = ProcessConfig(deployment="fail-test", process_id=pid, role=role, node="local",
                            daemon_address=self.address, recipe_text=self.recipe, topology_text=TOPOLOGY,
                            keys_path=str(key_path), run_dir=str(self.tmp), heartbeat_interval_s=0.2,
                            daemon_grace_s=30.0, cpu_threads=1, extra={"http_port": "0"})
        path = self.tmp / f"{pid}.json"
        path.write_text(cfg.to_json())
        log = open(self.tmp / f"{pid}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.procs[pid] = await asyncio.create_subprocess_exec(
            *DYN, "frontend" if role == "frontend" else "worker", "--config", str(path),
            stdout=log, stderr=log, env=env)
        log.close()
        self.roles_of[pid] = role
        if role != "frontend":
            self._tasks.append(asyncio.create_task(self._watch(pid)))

    async def _watch(self, pid: str) -> None:
        await self.procs[pid].wait()
        self.dead.add(pid)
        await self.push_workers()
        if self.relaunch:
            await self._launch(f"worker-{next(self._ids)}", self.roles_of[pid])
