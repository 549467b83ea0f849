"""A mock worker's CPU per request, alone: `dyn worker` (zero-time mock engine) fed over its request plane.

The frontend is left out so the worker's own cost (request decode, engine hand-off, ~32 engine
steps, token chunks, KV events, heartbeats) is what is measured: a client in this process plays
the frontend (one DEALER, CURVE on as in a deployment, GenerateRequests of the bench_vs_dynamo
workload: 8 shared ~450-token prefixes + a unique 45-token suffix, 32 output tokens), and a fake
daemon answers registration and heartbeats. CPU time comes from /proc for the worker's PID, so the
client's own work is not counted. Reports, per run: req/s, worker CPU ms per request, reply
messages per request (a request's chunks, each its step's tokens), frames per request (a worker
of protocol 4 sends a step's chunks for one frontend in one frame), and the worker's idle CPU (percent of a core) over --idle-s seconds after
the load.

    .venv/bin/python scripts/bench_worker.py --requests 4000 --concurrency 32 --rounds 3 \\
        --before-dyn /work/main/.venv/bin/dyn

Runs are interleaved (this checkout, then the other, then again in reverse order), so load from
other users of the machine hits both alike. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from dyn.control.keys import DeploymentKeys, write_private
from dyn.control.requests import REQUEST_CODEC, GenerateRequest
from dyn.control.sampling import SamplingParams
from dyn.control.sockets import Security, client_socket, server_socket
from dyn.config.process import ProcessConfig

ROOT = Path(__file__).resolve().parents[1]
DYN = str(Path(sys.executable).with_name("dyn"))
HZ = os.sysconf("SC_CLK_TCK")

RECIPE = """name: bench-worker
model:
  engine: mock
  name: mock
  block_size: 16
  max_context: 8192
  mock_stream: {mock_stream}
  mock: {{prefill_base_s: 0.0, prefill_s_per_token: 0.0, decode_base_s: 0.0, decode_s_per_seq: 0.0,
         num_kv_blocks: {kv_blocks}}}
mode: aggregated
workers:
  both: {{replicas: 1, max_batch_size: 64}}
"""


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class FakeDaemon:
    """The daemon's side of the control plane, enough for workers: every message is acked
    (registration, heartbeats); remembers each worker's request address, readiness and protocol
    version (frames are read and answered by hand, in the worker's own version, so a
    --before-dyn checkout of an older protocol runs too)."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: DeploymentKeys) -> None:
        self.security = Security.from_keys(keys.for_process("daemon"))
        self.security.start(ctx)
        self.sock = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", self.security)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.addresses: dict[str, str] = {}
        self.ready: dict[str, asyncio.Event] = {}
        self.versions: dict[str, int] = {}
        self.task = asyncio.create_task(self._ack())

    async def _ack(self) -> None:
        while True:
            ident, data = await self.sock.recv_multipart()
            version, kind, fields = msgpack.unpackb(data, raw=False)
            if kind == "register":
                self.addresses[fields["process_id"]] = fields["addresses"]["request"]
                self.versions[fields["process_id"]] = version
            elif fields.get("state") == "ready":
                self.ready.setdefault(fields["process_id"], asyncio.Event()).set()
            await self.sock.send_multipart([ident, msgpack.packb([version, "register_ack", {"ok": True}])])

    def close(self) -> None:
        self.task.cancel()
        self.sock.close(linger=0)
        self.security.stop()


class Worker:
    """One `dyn worker` process of a given CLI, registered with the fake daemon."""

    def __init__(self, dyn: str, label: str, tmp: Path, keys: DeploymentKeys, process_id: str,
                 kv_blocks: int, mock_stream: str = "coalesced") -> None:
        self.dyn, self.label, self.tmp, self.keys, self.process_id = dyn, label, tmp, keys, process_id
        self.kv_blocks = kv_blocks
        self.mock_stream = mock_stream
        self.proc: subprocess.Popen | None = None
        self.address = ""

    async def start(self, daemon: FakeDaemon) -> None:
        keys_path = self.tmp / f"{self.process_id}.keys"
        write_private(keys_path, self.keys.for_process(self.process_id).to_json())
        cfg = ProcessConfig(deployment="bench", process_id=self.process_id, role="both", node="local",
                            daemon_address=daemon.address, recipe_text=RECIPE.format(kv_blocks=self.kv_blocks,
                                                                                 mock_stream=self.mock_stream),
                            topology_text=(ROOT / "topologies" / "local.yaml").read_text(),
                            keys_path=str(keys_path), run_dir=str(self.tmp))
        cfg_path = self.tmp / f"{self.process_id}.json"
        cfg_path.write_text(cfg.to_json())
        self.log = open(self.tmp / f"{self.process_id}.log", "wb")
        self.proc = subprocess.Popen([self.dyn, "worker", "--config", str(cfg_path)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        await asyncio.wait_for(daemon.ready.setdefault(self.process_id, asyncio.Event()).wait(), 120)
        self.address = daemon.addresses[self.process_id]
        self.version = daemon.versions[self.process_id]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def workload(n: int, groups: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 30000) for _ in range(450)] for _ in range(groups)]
    return [prefixes[rng.randrange(groups)] + [rng.randrange(3, 30000) for _ in range(45)] for _ in range(n)]


async def run_load(ctx: zmq.asyncio.Context, worker: Worker, keys: DeploymentKeys, prompts: list[list[int]],
                   concurrency: int, max_tokens: int, tag: str, hold_s: float = 0.0) -> dict:
    sock = client_socket(ctx, zmq.DEALER, worker.address, Security.from_keys(keys.for_process("frontend")))
    waiters: dict[str, asyncio.Future] = {}
    counts = {"messages": 0, "frames": 0, "tokens": 0}

    async def receive() -> None:
        while True:
            # By hand, not with this checkout's codec: a --before-dyn worker may speak an older
            # protocol version (3: a frame per chunk; 4: a step's chunks in one token_chunks frame).
            _, kind, body = msgpack.unpackb(await sock.recv(), raw=False)
            counts["frames"] += 1
            for kind, body in ([("token_chunk", c) for c in body["chunks"]] if kind == "token_chunks"
                               else [(kind, body)]):
                counts["messages"] += 1
                rid = body["request_id"]
                if kind == "token_chunk":
                    counts["tokens"] += len(body["token_ids"])
                    if body["finish"] is None:
                        continue
                elif kind != "finish":
                    raise SystemExit(f"worker answered {kind}: {body}")
                waiters.pop(rid).set_result(None)

    queue = list(enumerate(prompts))
    queue.reverse()

    async def client() -> None:
        while queue:
            i, prompt = queue.pop()
            rid = f"{tag}-{i}"
            done = asyncio.get_running_loop().create_future()
            waiters[rid] = done
            _, kind, fields = msgpack.unpackb(REQUEST_CODEC.encode(GenerateRequest(
                rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), hold_s=hold_s)))
            if worker.version < 5:  # (the same fields in protocols 3-4; 5 added hold_s)
                del fields["hold_s"]
            await sock.send(msgpack.packb([worker.version, kind, fields]))
            await done

    receiver = asyncio.create_task(receive())
    try:
        c0, load0, t0 = cpu_ticks(worker.proc.pid), os.getloadavg()[0], time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), 600)
        wall, c1 = time.perf_counter() - t0, cpu_ticks(worker.proc.pid)
    finally:
        receiver.cancel()
        sock.close(linger=0)
    n = len(prompts)
    return {"system": worker.label, "requests": n, "concurrency": concurrency, "wall_s": round(wall, 3),
            "req_per_s": round(n / wall, 1), "worker_cpu_ms_per_req": round(1e3 * (c1 - c0) / HZ / n, 3),
            "messages_per_req": round(counts["messages"] / n, 2), "frames_per_req": round(counts["frames"] / n, 2),
            "tokens_per_req": round(counts["tokens"] / n, 2),
            "load_avg": round((load0 + os.getloadavg()[0]) / 2, 2)}


async def idle_cpu(worker: Worker, seconds: float) -> float:
    c0 = cpu_ticks(worker.proc.pid)
    await asyncio.sleep(seconds)
    return round(100 * (cpu_ticks(worker.proc.pid) - c0) / HZ / seconds, 3)


async def main_async(a: argparse.Namespace) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="dyn-bench-worker-"))
    labels = [("dyn", a.dyn)] + ([("dyn before", a.before_dyn)] if a.before_dyn else [])
    keys = DeploymentKeys.generate(["daemon", "frontend"] + [f"worker-{i}" for i in range(len(labels))])
    ctx = zmq.asyncio.Context()
    workers = [Worker(cli, label, tmp, keys, f"worker-{i}", a.kv_blocks, a.mock_stream)
               for i, (label, cli) in enumerate(labels)]
    results: list[dict] = []
    daemon = FakeDaemon(ctx, keys)
    finished = False
    try:
        for w in workers:
            await w.start(daemon)
        for w in workers:  # warm-up: the prefixes' blocks cached, code paths loaded
            await run_load(ctx, w, keys, workload(64, a.groups, seed=99), a.concurrency, a.max_tokens, "warm")
        for rnd in range(a.rounds):
            for w in (workers if rnd % 2 == 0 else workers[::-1]):
                r = await run_load(ctx, w, keys, workload(a.requests, a.groups, seed=rnd), a.concurrency,
                                   a.max_tokens, f"r{rnd}", a.hold_s)
                r["idle_cpu_percent"] = await idle_cpu(w, a.idle_s) if a.idle_s > 0 else None
                r["round"] = rnd
                results.append(r)
                print(json.dumps(r), flush=True)
        finished = True
    finally:
        for w in workers:
            w.stop()
        daemon.close()
        ctx.destroy(linger=0)
        if finished:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"the workers' logs are kept in {tmp}", file=sys.stderr)
    return results


def table(results: list[dict]) -> str:
    rows = ["| system | req/s (median, range) | worker CPU ms/req (median, range) | messages/req | frames/req "
            "| idle CPU % | load avg | runs |", "|---|---|---|---|---|---|---|---|"]
    for system in dict.fromkeys(r["system"] for r in results):
        rs = [r for r in results if r["system"] == system]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        rng = lambda k: f"{min(r[k] for r in rs):g}-{max(r[k] for r in rs):g}"  # noqa: E731
        idle = [r["idle_cpu_percent"] for r in rs if r["idle_cpu_percent"] is not None]
        rows.append(f"| {system} | {med('req_per_s'):.0f} ({rng('req_per_s')}) | {med('worker_cpu_ms_per_req'):.3f} "
                    f"({rng('worker_cpu_ms_per_req')}) | {med('messages_per_req'):.2f} | {med('frames_per_req'):.2f} | "
                    f"{statistics.median(idle) if idle else float('nan'):.2f} | {med('load_avg'):.1f} | {len(rs)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dyn", default=DYN, help="the dyn CLI under test (default: this checkout's)")
    ap.add_argument("--before-dyn", default=None, help="another checkout's dyn CLI, run in the same rounds")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--kv-blocks", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mock-stream", choices=("coalesced", "per_step"), default="coalesced",
                    help="recipe model.mock_stream: per_step sends every step's tokens on their own, as an "
                         "engine whose steps take time (both checkouts must know the field)")
    ap.add_argument("--hold-s", type=float, default=0.0,
                    help="GenerateRequest.hold_s, as a frontend sets it for a non-streaming request (0.5); a "
                         "worker of protocol 4 or older does not know the field and streams every step")
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle CPU measured this long after each run")
    a = ap.parse_args()
    results = asyncio.run(main_async(a))
    print(f"\n{os.cpu_count()} CPUs; {a.rounds} interleaved rounds of {a.requests} requests at concurrency "
          f"{a.concurrency}, {a.max_tokens} output tokens; zero-time mock engine\n")
    print(table(results))


if __name__ == "__main__":
    main()
