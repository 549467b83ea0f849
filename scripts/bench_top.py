"""`dyn top` cost at rack scale: frame time of the view model + renderer, and the CPU of a live loop.

Frame time: synthetic status payloads shaped like the daemon's detailed reply
(72 and 576 workers, cumulative counters advancing each frame) are fed to
build_view + render_frame into an off-screen console the size of a terminal.
CPU: the same pipeline run once a second (the `dyn top` cadence) for a few
seconds, measured with process_time. No daemon is involved in either
figure: the daemon's own cost of 576 heartbeating workers belongs to the
planner benchmarks.

    .venv/bin/python scripts/bench_top.py [--frames 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from rich.console import Console

from dyn.dashboard.render import Screen, render_frame
from dyn.dashboard.synthetic import step, synthetic_payload
from dyn.dashboard.view import Tracker, build_view


def frame_times(num_workers: int, frames: int, height: int, width: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per frame (wall suffers from a shared machine; CPU does not)."""
    payload, tracker = synthetic_payload(num_workers), Tracker()
    console = Console(file=io.StringIO(), width=width, height=height, color_system="truecolor")
    out, cpu = [], []
    for i in range(frames):
        step(payload, 1.0, seed=i)
        started, cpu0 = time.perf_counter(), time.process_time()
        tracker.observe(payload, None, float(i))
        view = build_view(payload, tracker)
        console.print(render_frame(view, Screen(selected=(i * 7) % num_workers, height=height)))
        out.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu0)
        console.file.seek(0)
        console.file.truncate()
    return out, cpu


def cpu_share(num_workers: int, seconds: float, height: int, width: int) -> float:
    payload, tracker = synthetic_payload(num_workers), Tracker()
    console = Console(file=io.StringIO(), width=width, height=height, color_system="truecolor")
    cpu0, wall0 = time.process_time(), time.monotonic()
    i = 0
    while time.monotonic() - wall0 < seconds:
        step(payload, 1.0, seed=i)
        tracker.observe(payload, None, float(i))
        console.print(render_frame(build_view(payload, tracker), Screen(height=height)))
        console.file.seek(0)
        console.file.truncate()
        i += 1
        time.sleep(max(0.0, wall0 + i - time.monotonic()))
    return 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=50)
    parser.add_argument("--width", type=int, default=160)
    args = parser.parse_args()
    print(f"terminal {args.width}x{args.height}; synthetic payloads (see module doc)")
    for n in (72, 576):
        wall, cpu_times = (sorted(t) for t in frame_times(n, args.frames, args.height, args.width))
        p50, p99 = statistics.median(wall), wall[min(len(wall) - 1, int(0.99 * len(wall)))]
        cpu = cpu_share(n, args.seconds, args.height, args.width)
        print(f"{n:4d} workers: frame wall p50 {1000 * p50:6.1f} ms  p99 {1000 * p99:6.1f} ms  "
              f"frame CPU p50 {1000 * statistics.median(cpu_times):5.1f} ms  "
              f"CPU at 1 frame/s {cpu:5.1f}% of one core")


if __name__ == "__main__":
    main()
