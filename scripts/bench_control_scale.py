#!/usr/bin/env python
"""The daemon's control-plane work at site scale, measured in-process with the live code.

A 100-rack site (topologies/gb200-nvl72x100 with recipes/llama-3.1-70b-nvl72:
2,000 workers + frontends) cannot be brought up on this machine, but the
daemon's per-message work can be timed with its own functions at that size:

  * heartbeat: decode one worker heartbeat (CONTROL_CODEC, ~40 metrics as a GPU
    worker sends) and apply it (DaemonControl._handle, the daemon's handler);
  * status: build `dyn status`'s payload (status_payload) over N process slots
    and encode the reply;
  * update_workers: the worker list the daemon pushes to every frontend on each
    fleet change (worker_list + encode).

CPU time (this thread) per operation, and bytes. scripts/bench_bringup.py gives
the whole daemon's figures at 72 workers over real SSH; docs/scale.md combines
both.

    .venv/bin/python scripts/bench_control_scale.py [--slots 72 2100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyn.control.messages import CONTROL_CODEC, CliReply, Heartbeat  # noqa: E402
from dyn.planner.daemon_control import DaemonControl  # noqa: E402
from dyn.planner.health import ProcessSlot  # noqa: E402
from dyn.planner.report import status_payload, worker_list  # noqa: E402


def heartbeat_metrics(idx: int) -> dict[str, float]:
    """What a GPU worker's heartbeat carries (dyn/worker/process_metrics.py `_metrics`), tp4."""
    values = {k: float(idx + i) for i, k in enumerate((
        "num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "kv_usage", "prefix_hit_blocks",
        "prefix_lookup_blocks", "num_computed_tokens", "num_generated_tokens", "waiting_prefill_tokens",
        "in_flight", "requests_total", "tokens_per_s", "prompt_tokens_per_s", "requests_per_s",
        "kv_offers", "kv_pulls", "kv_pull_failures", "kv_local_fallbacks", "kv_bytes_pulled", "kv_pull_seconds",
        "shuttle_bytes.cuda_ipc", "shuttle_gbps.cuda_ipc", "cpu_percent", "rss_bytes"))}
    for gpu in range(4):
        for key in ("utilization", "memory_used_bytes", "temperature_c", "power_w"):
            values[f"gpu{gpu}.{key}"] = 1.0 + gpu
    return values


def make_slots(num: int) -> list[ProcessSlot]:
    slots = []
    for i in range(num):
        role = "frontend" if i % 21 == 20 else ("prefill" if i % 5 < 2 else "decode")
        rack, tray = divmod(i // 2, 18)
        slot = ProcessSlot(id=f"{role}-{i}", role=role, node=f"r{rack:03d}-tray{tray + 1:02d}", gpus=(0, 1, 2, 3),
                           state="ready", pid=10_000 + i, registered=True,
                           addresses={"request": f"tcp://10.1.{rack % 100}.{11 + tray}:{20000 + i}",
                                      "kv_events": f"tcp://10.1.{rack % 100}.{11 + tray}:{30000 + i}",
                                      "metrics": f"http://10.1.{rack % 100}.{11 + tray}:{40000 + i}/metrics"},
                           metrics=heartbeat_metrics(i))
        slots.append(slot)
    return slots


def cpu_us(fn, repeat: int) -> float:
    start = time.thread_time_ns()
    for _ in range(repeat):
        fn()
    return (time.thread_time_ns() - start) / repeat / 1e3


def measure(num_slots: int) -> dict:
    slots = make_slots(num_slots)
    fleet = SimpleNamespace(slots={s.id: s for s in slots})
    daemon = SimpleNamespace(fleet=fleet, deadlines=SimpleNamespace(heartbeat_interval_s=1.0),
                             _fail=lambda slot, why: None)
    worker = next(s for s in slots if s.role == "decode")
    frame = CONTROL_CODEC.encode(Heartbeat(process_id=worker.id, state="ready", metrics=heartbeat_metrics(7),
                                           info={"role": "decode"}))
    identity = worker.id.encode()

    def one_heartbeat() -> None:
        DaemonControl._handle(daemon, identity, CONTROL_CODEC.decode(frame))  # type: ignore[arg-type]

    def one_status() -> bytes:
        payload = status_payload(name="site", phase="running", started_at=0.0, wall_now=time.time(),
                                 now=time.monotonic(), frontend_url="http://10.1.0.11:8000", config_hash="x",
                                 slots=slots, events=[], error="", daemon={})
        return CONTROL_CODEC.encode(CliReply(ok=True, payload=payload))

    def one_update() -> bytes:
        from dyn.control.messages import Command
        return CONTROL_CODEC.encode(Command("update_workers", {"workers": worker_list(slots)}))

    repeat = max(3, 20_000 // num_slots)
    return {
        "processes": num_slots,
        "heartbeat_bytes": len(frame),
        "heartbeat_cpu_us": round(cpu_us(one_heartbeat, 5000), 1),
        "status_bytes": len(one_status()),
        "status_cpu_ms": round(cpu_us(one_status, repeat) / 1e3, 2),
        "update_workers_bytes": len(one_update()),
        "update_workers_cpu_ms": round(cpu_us(one_update, repeat) / 1e3, 2),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[72, 2100])
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    rows = [measure(n) for n in args.slots]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
