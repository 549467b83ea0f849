"""Frontend overhead benchmark: requests/s and added latency against zero-time workers.

Three kinds of processes, so the load generator never shares an event loop
with what it measures:

    workers   two request-plane ROUTERs (CURVE) that answer every request at
              once: `--tokens` TokenChunks (one per token, as a real worker
              streams) and a Finish; with `--step-ms`, one token per request
              every step (all requests of a worker in one frame a step, as a
              GPU engine's decode steps come), so each token reaches a
              stream that is waiting for it
    frontend  the real dyn frontend (aiohttp on uvloop, WorkerPool, router)
    client    an aiohttp load generator at a fixed concurrency (HTTP), or a
              direct ZMQ DEALER client to the workers (the baseline)

Added latency = frontend latency - direct ZMQ latency, at the same percentile.

    .venv/bin/python scripts/bench_frontend.py                 # full matrix, ~1 min
    .venv/bin/python scripts/bench_frontend.py --duration 3 --concurrency 8
    .venv/bin/python scripts/bench_frontend.py --step-ms 20 --concurrency 64   # paced like a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-mock"


# ---- workers ---------------------------------------------------------------

async def run_workers(keys_path: str, num: int, step_s: float = 0.0) -> None:
    import zmq
    import zmq.asyncio

    from dyn.control.keys import DeploymentKeys
    from dyn.control.requests import REQUEST_CODEC, Finish, GenerateRequest, TokenChunk, TokenChunks
    from dyn.control.sockets import Security, server_socket

    keys = DeploymentKeys.load(Path(keys_path))
    encode, decode = REQUEST_CODEC.encode, REQUEST_CODEC.decode

    async def serve(sock) -> None:
        while True:
            client, data = await sock.recv_multipart()
            msg = decode(data)
            if not isinstance(msg, GenerateRequest):
                continue
            rid, n = msg.request_id, msg.sampling.max_tokens or 16
            for i in range(n):
                # (as a worker sends a step's chunks: one TokenChunks frame, here of one request)
                sock.send_multipart([client, encode(TokenChunks([TokenChunk(rid, [1000 + i])]))])
            await sock.send_multipart([client, encode(Finish(rid, "length", len(msg.prompt_token_ids), n))])

    async def serve_stepped(sock) -> None:
        running: dict[str, list] = {}  # request id -> [client, tokens sent, max tokens, prompt tokens]

        async def step() -> None:
            while True:
                await asyncio.sleep(step_s)
                frames: dict[bytes, list] = {}
                for rid, entry in list(running.items()):
                    client, sent, n, prompt = entry
                    finish = Finish(rid, "length", prompt, n) if sent + 1 == n else None
                    frames.setdefault(client, []).append(TokenChunk(rid, [1000 + sent], finish=finish))
                    entry[1] += 1
                    if finish is not None:
                        del running[rid]
                for client, chunks in frames.items():
                    sock.send_multipart([client, encode(TokenChunks(chunks))])

        stepper = asyncio.create_task(step())  # (referenced for as long as this coroutine runs)
        while not stepper.done():
            client, data = await sock.recv_multipart()
            msg = decode(data)
            if isinstance(msg, GenerateRequest):
                running[msg.request_id] = [client, 0, msg.sampling.max_tokens or 16, len(msg.prompt_token_ids)]

    addresses, tasks, securities = [], [], []
    for i in range(num):
        sec = Security.from_keys(keys.for_process(f"w{i}"))
        sock = server_socket(zmq.asyncio.Context(), zmq.ROUTER, "tcp://127.0.0.1:*", sec)
        securities.append(sec)
        addresses.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        tasks.append(asyncio.create_task(serve_stepped(sock) if step_s > 0 else serve(sock)))
    print(json.dumps({"addresses": addresses}), flush=True)
    await asyncio.gather(*tasks)


# ---- frontend --------------------------------------------------------------

async def run_frontend(keys_path: str, addresses: list[str]) -> None:
    import zmq.asyncio

    from dyn.config.recipe import ModelSpec, Recipe, RouterSpec, WorkerGroup
    from dyn.control.keys import DeploymentKeys
    from dyn.control.sockets import Security
    from dyn.frontend.app import build_app, start_site
    from dyn.frontend.process import build_frontend, worker_limits
    from dyn.frontend.workers import WorkerPool

    recipe = Recipe(name="bench", model=ModelSpec(path=MODEL, engine="mock", max_context=4096),
                    workers=(WorkerGroup("both", replicas=len(addresses), max_batch_size=256, max_queue=4096),),
                    router=RouterSpec(policy="kv"))
    keys = DeploymentKeys.load(Path(keys_path))
    pool = WorkerPool(zmq.asyncio.Context(), Security.from_keys(keys.for_process("frontend")),
                      worker_limits(recipe))
    for i, address in enumerate(addresses):
        pool.add(f"w{i}", "both", address)
    frontend = build_frontend(recipe, pool)
    _, port = await start_site(build_app(frontend), "127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)
    await asyncio.Event().wait()


# ---- clients ---------------------------------------------------------------

async def http_client(url: str, concurrency: int, duration_s: float, stream: bool, tokens: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    body = {"model": MODEL, "max_tokens": tokens, "stream": stream, "ignore_eos": True}

    async def loop(idx: int, session: aiohttp.ClientSession, deadline: float, record: bool) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < deadline:
            payload = dict(body, prompt=f"benchmark prompt {idx} {n}")
            n += 1
            start = time.perf_counter()
            first = None
            async with session.post(url, json=payload) as r:
                if r.status != 200:
                    errors += 1
                    await r.read()
                    continue
                if stream:
                    async for _line in r.content:
                        if first is None:
                            first = time.perf_counter()
                else:
                    await r.read()
            end = time.perf_counter()
            if record:
                latencies.append(end - start)
                if first is not None:
                    ttfts.append(first - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm = time.perf_counter() + min(1.0, duration_s / 4)
        await asyncio.gather(*(loop(i, session, warm, False) for i in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(loop(i, session, start + duration_s, True) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(latencies, ttfts, elapsed, errors)


async def direct_client(keys_path: str, addresses: list[str], concurrency: int, duration_s: float,
                        tokens: int) -> dict:
    import zmq
    import zmq.asyncio

    from dyn.control.keys import DeploymentKeys
    from dyn.control.requests import REQUEST_CODEC, Finish, GenerateRequest, TokenChunks
    from dyn.control.sampling import SamplingParams
    from dyn.control.sockets import Security, client_socket

    keys = DeploymentKeys.load(Path(keys_path))
    ctx = zmq.asyncio.Context()
    sec = Security.from_keys(keys.for_process("frontend"))
    socks = [client_socket(ctx, zmq.DEALER, a, sec) for a in addresses]
    waiting: dict[str, tuple[asyncio.Future, list]] = {}
    latencies, ttfts = [], []

    import msgpack

    async def reader(sock) -> None:
        # As lean as a client can be: drain without a future per message, read
        # only the tag and request id (the frontend validates every message).
        raw = zmq.Socket.shadow(sock.underlying)
        while True:
            data = await sock.recv()
            while True:
                _, tag, fields = msgpack.unpackb(data)
                for item in fields["chunks"] if tag == TokenChunks.TYPE else (fields,):
                    entry = waiting.get(item["request_id"])
                    if entry is not None:
                        if not entry[1]:
                            entry[1].append(time.perf_counter())
                        if tag == Finish.TYPE or item.get("finish") is not None:  # (a last chunk carries it)
                            entry[0].set_result(None)
                try:
                    data = raw.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break

    readers = [asyncio.create_task(reader(s)) for s in socks]
    counter = iter(range(10**9))

    async def loop(idx: int, deadline: float, record: bool) -> None:
        while time.perf_counter() < deadline:
            rid = f"d{next(counter)}"
            fut = asyncio.get_running_loop().create_future()
            waiting[rid] = (fut, [])
            start = time.perf_counter()
            req = GenerateRequest(rid, list(f"benchmark prompt {idx}".encode()), SamplingParams(max_tokens=tokens))
            await socks[hash(rid) % len(socks)].send(REQUEST_CODEC.encode(req))
            await fut
            end = time.perf_counter()
            first = waiting.pop(rid)[1][0]
            if record:
                latencies.append(end - start)
                ttfts.append(first - start)

    warm = time.perf_counter() + min(1.0, duration_s / 4)
    await asyncio.gather(*(loop(i, warm, False) for i in range(concurrency)))
    start = time.perf_counter()
    await asyncio.gather(*(loop(i, start + duration_s, True) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    for r in readers:
        r.cancel()
    for s in socks:
        s.close(linger=0)
    sec.stop()
    ctx.term()
    return _summary(latencies, ttfts, elapsed, 0)


def _summary(latencies: list[float], ttfts: list[float], elapsed: float, errors: int) -> dict:
    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99)}


# ---- orchestration ---------------------------------------------------------

def _spawn(args: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"helper {args[:2]} failed to start")
    return proc, json.loads(line)


def _client(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["orchestrate", "workers", "frontend", "http", "direct"],
                        default="orchestrate", help=argparse.SUPPRESS)
    parser.add_argument("--keys")
    parser.add_argument("--addresses", default="")
    parser.add_argument("--url")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="pace the workers: one token per request every step (0: all at once)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import uvloop

    if args.role == "workers":
        uvloop.run(run_workers(args.keys, args.workers, args.step_ms / 1000))
    elif args.role == "frontend":
        uvloop.run(run_frontend(args.keys, args.addresses.split(",")))
    elif args.role == "http":
        print(json.dumps(uvloop.run(http_client(args.url, args.concurrency[0], args.duration, args.stream,
                                                args.tokens))))
    elif args.role == "direct":
        print(json.dumps(uvloop.run(direct_client(args.keys, args.addresses.split(","), args.concurrency[0],
                                                  args.duration, args.tokens))))
    else:
        orchestrate(args)


def orchestrate(args: argparse.Namespace) -> None:
    from dyn.control.keys import DeploymentKeys

    procs: list[subprocess.Popen] = []
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys_path = str(Path(tmp) / "keys.json")
            DeploymentKeys.generate(["frontend"] + [f"w{i}" for i in range(args.workers)]).save(Path(keys_path))
            workers, info = _spawn(["--role", "workers", "--keys", keys_path, "--workers", str(args.workers),
                                    "--step-ms", str(args.step_ms)])
            procs.append(workers)
            addresses = ",".join(info["addresses"])
            frontend, info = _spawn(["--role", "frontend", "--keys", keys_path, "--addresses", addresses])
            procs.append(frontend)
            url = f"http://127.0.0.1:{info['port']}/v1/completions"
            common = ["--duration", str(args.duration), "--tokens", str(args.tokens)]
            for conc in args.concurrency:
                direct = _client(["--role", "direct", "--keys", keys_path, "--addresses", addresses,
                                  "--concurrency", str(conc), *common])
                for stream in (False, True):
                    cpu_before = _cpu_s(frontend.pid)
                    http = _client(["--role", "http", "--url", url, "--concurrency", str(conc), *common]
                                   + (["--stream"] if stream else []))
                    cpu_ms = (_cpu_s(frontend.pid) - cpu_before) * 1000
                    # includes the warm-up requests: an upper bound per measured request
                    per_request = cpu_ms / max(http["requests"], 1)
                    row = {"concurrency": conc, "stream": stream, **http,
                           "frontend_cpu_ms_per_request": per_request,
                           "direct_rps": direct["rps"], "direct_p50_ms": direct["p50_ms"],
                           "direct_p99_ms": direct["p99_ms"],
                           "added_p50_ms": http["p50_ms"] - direct["p50_ms"],
                           "added_p99_ms": http["p99_ms"] - direct["p99_ms"]}
                    results.append(row)
                    print(_row(row), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _row(r: dict) -> str:
    mode = "stream " if r["stream"] else "non-str"
    ttft = f" ttft p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} ms" if r["stream"] else ""
    return (f"c={r['concurrency']:<3} {mode} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms"
            f"{ttft}  | direct zmq {r['direct_rps']:6.0f} req/s p50 {r['direct_p50_ms']:.1f} ms"
            f"  | added p50 {r['added_p50_ms']:+.1f} p99 {r['added_p99_ms']:+.1f} ms"
            f"  | frontend cpu {r['frontend_cpu_ms_per_request']:.2f} ms/req  errors {r['errors']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
