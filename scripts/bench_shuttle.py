#!/usr/bin/env python
"""Shuttle bandwidth per transport against a single-process memcpy of the same size, in one run.

The sender runs in a child process (a real prefill worker's position) and
offers a pre-faulted pool; this process pulls into a pre-faulted destination
pool, as a decode worker would. Each cell is the median of --repeats pulls.
End to end = rx.pull() from its call (the offer in hand) until the last block
has landed in the destination and been verified. shm runs once per mode
(dyn.shuttle.wire): "shm" is "direct" (the receiver reads the sender's blocks
with process_vm_readv: one copy, on the receiver's core), "shm:ring" the
fenced ring (a copy in each process, on both cores at once: hold it against
the 2-thread memcpy too), "shm:ring+xxh3" the ring with checksums (the mode
before this change).

    .venv/bin/python scripts/bench_shuttle.py [--sizes-mib 1 16 64 256] [--block-kib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from dyn.config.recipe import ShuttleSpec
from dyn.engine.host_memory import host_pool
from dyn.shuttle import OfferDescriptor, ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender
from dyn.shuttle.blocks import copy_checksum
from dyn.shuttle.ring import ShmRing, sweep_stale_segments
from dyn.shuttle.wire import SHM_DIRECT, SHM_MODES, SHM_RING, SHM_RING_XXH3

SHM_COLUMNS = {SHM_DIRECT: "shm", SHM_RING: "shm:ring", SHM_RING_XXH3: "shm:ring+xxh3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--block-kib", type=int, default=512, help="KV block payload size")
    parser.add_argument("--transports", nargs="+", default=None, help="default: every usable one")
    parser.add_argument("--chunk-mib", type=int, default=None,
                        help="sender payload per message (default: SenderConfig's)")
    parser.add_argument("--inflight-mib", type=int, default=ShuttleSpec().max_inflight_mib,
                        help="recipe shuttle.max_inflight_mib: the sender's shm ring and the receiver's credit "
                             "(default: the recipe default)")
    parser.add_argument("--shm-modes", nargs="+", default=list(SHM_MODES), choices=list(SHM_MODES),
                        help="shm modes to measure, a column each")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    block_bytes = args.block_kib << 10
    transports = args.transports or _usable_transports()
    import uvloop  # both sides on the event loop dyn's workers run (dyn.cli.process)

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.serve:
        asyncio.run(_serve(block_bytes, max(args.sizes_mib), transports, args.chunk_mib, args.inflight_mib))
        return
    load_before = os.getloadavg()
    columns = [(SHM_COLUMNS[mode] if t == "shm" else t, t, mode)
               for t in sorted(transports, key=lambda t: t == "nixl")  # nixl last: its threads poll
               for mode in (args.shm_modes if t == "shm" else [SHM_DIRECT])]
    rows = asyncio.run(_measure(block_bytes, args.sizes_mib, transports, columns, args.repeats, args.chunk_mib,
                                args.inflight_mib))
    _print_table(rows, [label for label, _, _ in columns], args, load_before)


def _usable_transports() -> list[str]:
    from dyn.shuttle.transports import nixl

    names = ["shm", "tcp"] + (["nixl"] if nixl.is_available() else [])
    try:
        import torch

        if torch.cuda.is_available():
            names.insert(0, "cuda_ipc")
    except ImportError:
        pass
    return names


async def _serve(block_bytes: int, max_mib: int, transports: list[str], chunk_mib: int | None,
                 inflight_mib: int) -> None:
    """Child: offer the first N blocks of one pool whenever the parent asks on stdin."""
    num_blocks = (max_mib << 20) // block_bytes
    # allocated as the engines allocate their KV pools (dyn.engine.host_memory: huge pages asked for)
    pool = np.frombuffer(host_pool(num_blocks * block_bytes), dtype=np.uint8).reshape(num_blocks, block_bytes)
    pool[:] = np.random.default_rng(0).integers(0, 256, (num_blocks, block_bytes), dtype=np.uint8)
    views = [memoryview(b) for b in pool]
    hashes = list(range(1, num_blocks + 1))
    config = SenderConfig(pin_timeout_s=60.0, transports=tuple(transports), ring_bytes=inflight_mib << 20)
    if chunk_mib is not None:
        config = dataclasses.replace(config, chunk_bytes=chunk_mib << 20)
    loop = asyncio.get_running_loop()
    async with ShuttleSender(block_bytes, config=config) as tx:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            n = int(line)
            offer = tx.offer(f"bench-{time.monotonic_ns()}", hashes[:n], views[:n])
            print(json.dumps(offer.descriptor.to_dict()), flush=True)


async def _measure(block_bytes: int, sizes_mib: list[int], transports: list[str],
                   columns: list[tuple[str, str, str]],
                   repeats: int, chunk_mib: int | None, inflight_mib: int) -> list[dict[str, float]]:
    chunk = ["--chunk-mib", str(chunk_mib)] if chunk_mib is not None else []
    chunk += ["--inflight-mib", str(inflight_mib)]
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--block-kib", str(block_bytes >> 10),
                              "--sizes-mib", str(max(sizes_mib)), *chunk, "--transports", *transports],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        max_blocks = (max(sizes_mib) << 20) // block_bytes  # the decode pool, as an engine allocates it
        dest = np.frombuffer(host_pool(max_blocks * block_bytes), dtype=np.uint8).reshape(max_blocks, block_bytes)
        dest[:] = 1
        copy_src = np.random.default_rng(3).integers(0, 256, max(sizes_mib) << 20, dtype=np.uint8)
        copy_dst = np.ones_like(copy_src)
        rows = []
        for mib in sizes_mib:
            alone, cpu = _memcpy(mib << 20, repeats)
            rows.append({"mib": mib, "memcpy/alone": alone, "memcpy/cpu": cpu,
                         "memcpy2": _memcpy_2_threads(mib << 20, repeats),
                         "floor": _ring_floor(mib << 20, block_bytes, repeats, checksum=False),
                         "floor+xxh3": _ring_floor(mib << 20, block_bytes, repeats, checksum=True)})
        for label, transport, shm_mode in columns:
            config = dataclasses.replace(ReceiverConfig.from_spec(ShuttleSpec(max_inflight_mib=inflight_mib)),
                                         shm_mode=shm_mode)
            async with ShuttleReceiver(config=config) as rx:
                rx.prepare([transport])
                for row in rows:
                    num_blocks = (row["mib"] << 20) // block_bytes
                    samples, cpu_samples, copies = [], [], []
                    sender_ns, received = 0, 0
                    for i in range(repeats + 1):  # the first pull warms sockets and mappings
                        assert child.stdin is not None and child.stdout is not None
                        child.stdin.write(f"{num_blocks}\n")
                        child.stdin.flush()
                        desc = OfferDescriptor.from_dict(json.loads(child.stdout.readline()))
                        views = [memoryview(d) for d in dest[:num_blocks]]
                        # memcpy of the same size right before each pull: both see the same load
                        size = num_blocks * block_bytes
                        copy_start = time.perf_counter()
                        np.copyto(copy_dst[:size], copy_src[:size])
                        copies.append(size / (time.perf_counter() - copy_start) / 1e9)
                        sender_start = _process_cpu_ns(child.pid)
                        cpu_start, start = time.process_time(), time.perf_counter()
                        stats = await rx.pull(desc, list(range(num_blocks)), views, 60, transport=transport)
                        wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
                        if i:
                            sender_ns += _process_cpu_ns(child.pid) - sender_start
                            received += stats.num_bytes
                        if transport == "shm" and stats.shm_mode != shm_mode:
                            raise SystemExit(f"asked for shm mode {shm_mode}, got {stats.shm_mode}")
                        samples.append(stats.num_bytes / wall_s / 1e9)
                        cpu_samples.append(stats.num_bytes / cpu_s / 1e9 if cpu_s > 0 else float("inf"))
                    row[label] = statistics.median(samples[1:])
                    row[f"{label}/first"], row[f"{label}/first_cpu"] = samples[0], cpu_samples[0]
                    row[f"{label}/memcpy"] = statistics.median(copies[1:])
                    row.setdefault("memcpy/all", []).extend(copies[1:])  # type: ignore[attr-defined]
                    row[f"{label}/cpu"] = statistics.median(cpu_samples[1:])
                    row[f"{label}/sender"] = sender_ns / received  # ns per byte = s per GB
        for row in rows:
            row["memcpy"] = statistics.median(row.pop("memcpy/all"))  # type: ignore[arg-type]
        return rows
    finally:
        try:
            child.communicate(timeout=10)  # EOF on stdin: the sender closes and unlinks its ring
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)
            sweep_stale_segments()


def _memcpy(num_bytes: int, repeats: int) -> tuple[float, float]:
    """(wall GB/s, GB per CPU second) of one np.copyto of the whole size, alone, medians."""
    src = np.random.default_rng(1).integers(0, 256, num_bytes, dtype=np.uint8)
    dst = np.ones(num_bytes, dtype=np.uint8)
    samples, cpu_samples = [], []
    for _ in range(repeats + 1):
        cpu_start, start = time.process_time(), time.perf_counter()
        np.copyto(dst, src)
        cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - start
        samples.append(num_bytes / wall_s / 1e9)
        cpu_samples.append(num_bytes / cpu_s / 1e9 if cpu_s > 0 else float("inf"))
    return statistics.median(samples[1:]), statistics.median(cpu_samples[1:])


def _process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, in ns (schedstat: finer than /proc/pid/stat's ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def _memcpy_2_threads(num_bytes: int, repeats: int) -> float:
    """Wall GB/s of the same copy split in two halves on two threads (numpy drops the GIL)."""
    src = np.random.default_rng(1).integers(0, 256, num_bytes, dtype=np.uint8)
    dst = np.ones(num_bytes, dtype=np.uint8)
    half = num_bytes // 2
    samples = []
    for _ in range(repeats + 1):
        other = threading.Thread(target=np.copyto, args=(dst[half:], src[half:]))
        start = time.perf_counter()
        other.start()
        np.copyto(dst[:half], src[:half])
        other.join()
        samples.append(num_bytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(samples[1:])


def _ring_floor(num_bytes: int, block_bytes: int, repeats: int, *, checksum: bool) -> float:
    """GB per CPU second of the receiver's own work alone: every block copied (copy_checksum'd
    with `checksum`) out of a /dev/shm ring into private memory, in a loop with no messages
    (what shm could reach if its control path cost nothing)."""
    ring = ShmRing(num_bytes, 1)
    try:
        ring.slot_array(0)[:] = np.random.default_rng(2).integers(0, 256, num_bytes, dtype=np.uint8)
        src = ring.slot_array(0).reshape(-1, block_bytes)
        dst = np.ones_like(src)
        cpu_samples = []
        for _ in range(repeats + 1):
            cpu_start = time.process_time()
            for i in range(len(src)):
                if checksum:
                    copy_checksum(dst[i], src[i])
                else:
                    np.copyto(dst[i], src[i])
            cpu_s = time.process_time() - cpu_start
            cpu_samples.append(num_bytes / cpu_s / 1e9 if cpu_s > 0 else float("inf"))
        return statistics.median(cpu_samples[1:])
    finally:
        ring.close()


def _print_table(rows: list[dict[str, float]], labels: list[str], args: argparse.Namespace,
                 load_before: tuple[float, float, float]) -> None:
    print(f"shuttle end to end (pull called -> last block landed and verified), GB/s (1e9 B/s), median of "
          f"{args.repeats}; block {args.block_kib} KiB; max_inflight_mib {args.inflight_mib}; sender in a child "
          f"process; memcpy = a 1-thread np.copyto of the same size right before each pull (median over all "
          f"pulls); %memcpy = the column's median over the median of the copies made beside its own pulls; "
          f"alone = the same memcpy in a loop before any pull; 2 threads = that copy split over both cores")
    print(f"{'size':>8} {'memcpy':>8} {'alone':>8} {'2threads':>8}"
          + "".join(f" {t:>9} {'%memcpy':>8}" for t in labels))
    for row in rows:
        line = f"{row['mib']:>5} MiB {row['memcpy']:>8.2f} {row['memcpy/alone']:>8.2f} {row['memcpy2']:>8.2f}"
        for t in labels:
            line += f" {row[t]:>9.2f} {100 * row[t] / row[t + '/memcpy']:>7.0f}%"
        print(line)
    print("receiver process alone: ms of its CPU per GB received, all threads (the cost of one side "
          "when it is not starved of cores; nixl includes its polling progress thread); "
          "%memcpy = memcpy's CPU ms/GB over the receiver's; floor = the receiver's copy (floor+x: "
          "copy_checksum) of the same blocks from a shm ring in a plain loop, no messages")
    print(f"{'size':>8} {'memcpy':>8} {'floor':>9} {'%memcpy':>8} {'floor+x':>9} {'%memcpy':>8}"
          + "".join(f" {t:>9} {'%memcpy':>8}" for t in labels))
    for row in rows:
        line = f"{row['mib']:>5} MiB {1000 / row['memcpy/cpu']:>8.1f}"
        for key in ("floor", "floor+xxh3", *(t + "/cpu" for t in labels)):
            line += f" {1000 / row[key]:>9.1f} {100 * row[key] / row['memcpy/cpu']:>7.0f}%"
        print(line)
    print("the first pull of each cell (a new receiver: its socket to the sender, mappings, the direct "
          "read's pidfd and token; one sample, not a median): GB/s end to end, receiver CPU ms/GB")
    print(f"{'size':>8}" + "".join(f" {t:>9} {'cpu':>8}" for t in labels))
    for row in rows:
        print(f"{row['mib']:>5} MiB" + "".join(f" {row[t + '/first']:>9.2f} {1000 / row[t + '/first_cpu']:>8.1f}"
                                           for t in labels))
    print("sender process (child): ms of its CPU per GB sent, all threads, over the same pulls "
          "(not its offer, made before each pull)")
    print(f"{'size':>8}" + "".join(f" {t:>9}" for t in labels))
    for row in rows:
        print(f"{row['mib']:>5} MiB" + "".join(f" {1000 * row[t + '/sender']:>9.1f}" for t in labels))
    load = " ".join(f"{x:.1f}" for x in load_before)
    print(f"load average (1, 5, 15 min): {load} before, {' '.join(f'{x:.1f}' for x in os.getloadavg())} after, "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
