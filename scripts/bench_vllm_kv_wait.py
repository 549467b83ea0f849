"""A vLLM decode worker waiting for prompt KV: CPU while it waits, and first-token latency of real pulls.

Both halves run A/B inside one process, alternating the engine loop's pause
between "spin" (the old loop: step back to back) and "wait" (poll at
dyn.worker.engine_loop's TRANSFER_POLL_MIN_S..MAX_S), so machine load hits
both alike:

    idle      a remote decode whose prefill worker never answers (NIXL's handshake times out
              after 5 s): CPU of this process and of vLLM's executor process, steps/s, and how
              long an abort submitted meanwhile takes to run
    transfer  a prefill engine in a child process, real NIXL pulls over UCX: the time from
              add_remote_decode to the first streamed token

Roles are swapped on purpose: the decoding engine is built from the recipe's prefill group
and the prefilling one from its decode group, i.e. two workers the planner flipped in place
(dyn.planner.scaling.flips_in_place); the pulls succeeding shows a flip needs no restart.

    .venv/bin/python scripts/bench_vllm_kv_wait.py --model DIR      # a SmolLM2 HF dir (dyn model pull)

Measured here (SmolLM2-135M bf16, 1 OpenMP thread, 2 cores shared by 8 engineers).
Quietest run (load 2-3, `--pulls 10`):
    idle      spin: 200-230 steps/s, dyn's engine thread 6.7-10.3% of a core; abort queued
                    2.3-6.2 ms behind the step in flight
              wait:  76-80 steps/s,  dyn's engine thread 2.0-2.3%; abort queued 0.08 ms
              vLLM's executor processes (decoder and prefiller): 89-106% each in both modes
    transfer  first token after a real pull, median of 10: spin 78.6 ms, wait 68.7 ms
              (43-124 ms spread)
Six runs at load 7-20: the same picture (spin 125-2755 steps/s and 2-34%, wait 31-91 steps/s
and 0.6-3.7%; first-token medians spin 70-138 ms, wait 62-167 ms), except 4 of 11 aborts while
waiting at 53-155 ms under load 10-20 (a thread woken at nice 10 among ~12 runnable ones; none
at load 2-3). A run after rebasing on main (load 7-12, `--pulls 4`): first token spin 87-103 ms,
wait 94-445 ms (median 93 vs 214): on an oversubscribed CPU a thread that sleeps waits for a
core again when woken, a thread that spins keeps it. The quiet run shows no such cost.
  With vLLM's in-process executor (VLLM_ENABLE_V1_MULTIPROCESSING=0, what a tp=1 GPU worker
  uses), the step runs on dyn's engine thread: 8.5-26% of a core spinning, 0.3-0.8% waiting
  (load 12-27, `--pulls 6`).
What stays, and dominates on CPU (neither is dyn's loop):
  * NIXL's UCX progress thread (gdb: nixlUcxSharedThread::run -> poll(timeout=0)) takes a whole
    core in every engine with the NixlConnector, with no request at all: 97-100% measured on an
    idle engine at load 2 (0% without the connector; kv_connector_extra_config num_threads 1 or
    4: the same). It is the agent's progress thread: a bare nixl_agent idles at 96.7% of a core
    with enable_prog_thread=True (NIXL's default, which vLLM keeps) and 0.0% with False. vLLM
    builds that config itself (no option), so turning it off (transfers then progress only when
    the engine polls) needs a vLLM change or a connector subclass: not done here.
  * vLLM's executor process spins while any step came within the last second (its
    shared-memory queue busy-waits 1 s after each message, a fixed constant).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 5.0
"""vLLM's NIXL handshake gives up after this long (a fixed receive timeout in its connector)."""
RECIPE = """name: kv-wait
model:
  path: {model}
  engine: vllm
  device: cpu
  dtype: bfloat16
  block_size: 32
  max_context: 1024
mode: disaggregated
workers:
  prefill: {{max_batch_size: 4, max_num_batched_tokens: 512, kv_memory_gib: 1, cpu_threads: 1}}
  decode: {{max_batch_size: 8, max_num_batched_tokens: 256, kv_memory_gib: 1, cpu_threads: 1}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory (dyn model pull smollm2 DIR)")
    parser.add_argument("--pulls", type=int, default=10, help="real pulls per mode")
    args = parser.parse_args()
    recipe = Path(tempfile.mkdtemp()) / "kv-wait.yaml"
    recipe.write_text(RECIPE.format(model=Path(args.model).resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import dyn.worker.engine_loop as engine_loop
    from dyn.worker.engine_loop import EngineLoop

    modes = {"spin": (0.0, 0.0), "wait": (engine_loop.TRANSFER_POLL_MIN_S, engine_loop.TRANSFER_POLL_MAX_S)}

    def use(mode: str) -> None:
        engine_loop.TRANSFER_POLL_MIN_S, engine_loop.TRANSFER_POLL_MAX_S = modes[mode]

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_prefill_worker, args=(str(recipe), there))  # built as a decode worker
    child.start()
    engine = _engine(str(recipe), "prefill")  # decodes, built as a prefill worker
    outputs: list = []
    loop = EngineLoop(engine, outputs.extend)
    loop.start()
    try:
        assert here.recv() == "ready"
        idle = [{"mode": mode, **_idle(loop, here, use, mode, k)} for k, mode in enumerate(["spin", "wait"] * 2)]
        first: dict[str, list[float]] = {"spin": [], "wait": []}
        handshake_ms = _pull(loop, here, outputs, "warm-up", 99)  # the first pull also does NIXL's handshake
        for i in range(2 * args.pulls):
            mode = ("spin", "wait")[i % 2]
            use(mode)
            first[mode].append(_pull(loop, here, outputs, f"x{i}", i))
        print(json.dumps({"idle": idle, "first_pull_with_handshake_ms": handshake_ms, "first_token_ms": first,
                          "first_token_median_ms": {m: statistics.median(v) for m, v in first.items()},
                          "connector": {"transferred_tokens": engine.connector.prompt_tokens_transferred,
                                        "failed": engine.connector.failed_transfers},
                          "load_average": os.getloadavg()}, indent=1))
    finally:
        here.send(None)
        child.join(30)
        loop.stop()
        engine.close()


def _engine(recipe_path: str, role: str):
    from dyn.config.loader import load_recipe
    from dyn.engine.profiling import engine_env_for
    from dyn.engine.vllm_args import engine_kwargs
    from dyn.engine.vllm_engine import VllmEngine

    recipe = load_recipe(recipe_path)
    group = recipe.group(role)
    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_free_port())
    with engine_env_for(recipe.model, group, "cpu"):
        return VllmEngine(engine_kwargs(recipe.model, group, device="cpu", disaggregated=True))


def _prefill_worker(recipe_path: str, conn) -> None:
    """Child process: prefill what the parent sends, answer with (first token, transfer params)."""
    from dyn.engine.backend import EngineRequest, SamplingParams

    engine = _engine(recipe_path, "decode")
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        rid, prompt = msg
        engine.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=1), prefill_only=True))
        first = None
        while engine.has_work():
            first = next((o.token_ids[0] for o in engine.step() if o.token_ids), first)
        conn.send((first, engine.take_transfer_params(rid)))
    engine.close()


def _idle(loop, conn, use, mode: str, k: int) -> dict:
    import psutil

    from dyn.engine.backend import EngineRequest, SamplingParams

    use(mode)
    prompt = [3 + k] + list(range(100, 300))
    conn.send((f"idle{k}", prompt))
    first, params = conn.recv()
    ghost = {**params, "remote_port": _free_port(), "remote_engine_id": f"ghost-{k}"}  # nobody answers
    loop.submit(lambda e: e.add_remote_decode(EngineRequest(f"i{k}", prompt, SamplingParams(max_tokens=2)),
                                              ghost, first)).result()
    added = time.monotonic()
    time.sleep(0.5)
    me = psutil.Process()
    procs = {"dyn engine process": me, **{f"{c.name()} {c.pid}": c for c in me.children(recursive=True)}}
    engine_tid = loop._thread.native_id
    cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    thread0 = _thread_cpu_s(me, engine_tid)
    steps0, started = loop.num_steps, time.monotonic()
    time.sleep(3.0)
    elapsed = time.monotonic() - started
    cpu = {name: round(100 * (sum(p.cpu_times()[:2]) - cpu0[name]) / elapsed, 1) for name, p in procs.items()}
    cpu["dyn engine thread"] = round(100 * (_thread_cpu_s(me, engine_tid) - thread0) / elapsed, 1)
    steps_per_s = round((loop.num_steps - steps0) / elapsed, 1)
    ran: list[float] = []

    def abort(e) -> None:
        ran.append(time.perf_counter())
        e.abort(f"i{k}")
        ran.append(time.perf_counter())

    t = time.perf_counter()
    loop.submit(abort).result()
    done = time.perf_counter()
    # queued: until the engine thread took it (a step in progress, or waking up); run: vLLM's abort
    abort_ms = {"total": round((done - t) * 1e3, 2), "queued": round((ran[0] - t) * 1e3, 2),
                "run": round((ran[1] - ran[0]) * 1e3, 2)}
    time.sleep(max(0.0, added + HANDSHAKE_TIMEOUT_S + 0.5 - time.monotonic()))  # its failure lands in no later window
    return {"cpu_percent": cpu, "steps_per_s": steps_per_s, "abort_ms": abort_ms}


def _pull(loop, conn, outputs: list, rid: str, i: int) -> float:
    from dyn.engine.backend import EngineRequest, SamplingParams

    prompt = [11 + i] + list(range(300, 700))
    conn.send((rid, prompt))
    first, params = conn.recv()
    outputs.clear()
    t = time.perf_counter()
    loop.submit(lambda e: e.add_remote_decode(EngineRequest(rid, prompt, SamplingParams(max_tokens=2)),
                                              params, first)).result()
    while not outputs:
        time.sleep(0.0002)
    ms = round((time.perf_counter() - t) * 1e3, 1)
    while not any(o.finished for o in outputs):
        time.sleep(0.001)
    return ms


def _thread_cpu_s(process, tid: int) -> float:
    return next((t.user_time + t.system_time for t in process.threads() if t.id == tid), 0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
