"""Fast replica start in the worker: where its weights come from, and serving them to others.

    start:  key <- config.json, safetensors headers, sampled pages (a few KiB read)
            peers <- daemon (weight_peers: ready workers with the same key, best path first)
            engine thread: build the model on an empty arena, then
                peers? fetch_weights(arena, peers) ---- incomplete? --> the missing tensors from disk
                none?  read the checkpoint
    ready:  manifest (the peer's, verified; or hashed from our own arena after a disk load,
            off the critical path), written once per node; then a WeightServer offers the arena.

The heartbeat carries `info.weights` (key, server address, source, peer, path,
seconds) for the daemon's peer choice and `dyn status`, and metrics
`weights_load_seconds.<source>` / `time_to_ready_seconds.<source>` for
Prometheus and the planner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyn.control.sockets import Security
from dyn.weights.fetch import FetchConfig, FetchResult, Peer, fetch_weights
from dyn.weights.manifest import (ManifestError, WeightManifest, build_manifest, manifest_path, read_manifest,
                                  weights_key, write_once)

log = logging.getLogger(__name__)

PEER_WAIT_POLL_S = 1.0
CORRUPT_HOOK_ENV = "DYN_TEST_CORRUPT_WEIGHT_BLOCKS"
"""Test hook (serving side): comma-separated arena block indices served corrupted once each."""


@dataclass(slots=True)
class WeightReport:
    """How this worker got its weights; shown by `dyn status`, exported to Prometheus."""

    key: str = ""
    source: str = ""
    """disk | peer | peer+disk (a peer delivered part, the disk the rest)."""
    peer: str = ""
    transport: str = ""
    load_s: float = 0.0
    ready_s: float = 0.0
    """Process start -> ready (interpreter, imports, weights, KV pool)."""
    num_bytes: int = 0
    num_refetched: int = 0
    failures: list[str] = field(default_factory=list)
    address: str = ""
    """This worker's WeightServer, once it serves."""

    def info(self) -> dict[str, Any]:
        out = {"key": self.key, "source": self.source, "peer": self.peer, "transport": self.transport,
               "load_s": round(self.load_s, 3), "ready_s": round(self.ready_s, 3), "bytes": self.num_bytes,
               "refetched": self.num_refetched, "address": self.address}
        if self.failures:
            out["fallback"] = self.failures[-3:]
        return out

    def metrics(self) -> dict[str, float]:
        if not self.source:
            return {}
        return {f"weights_load_seconds.{self.source}": self.load_s,
                f"time_to_ready_seconds.{self.source}": self.ready_s}


def compute_key(recipe: Any, role: str) -> str:
    group = recipe.group(role) or recipe.workers[0]
    return weights_key(recipe.model.path, engine=recipe.model.engine, dtype=recipe.model.dtype,
                       tp_size=group.tp, tp_rank=0)


async def find_peers(ask: Callable[[str, dict, float], Any], *, process_id: str, key: str, source: str,
                     wait_s: float) -> list[Peer]:
    """Ask the daemon for peers. `source: peer` waits while workers ahead of us are still loading."""
    if source == "disk":
        return []
    deadline = time.monotonic() + wait_s
    while True:
        reply = await ask("weight_peers", {"process_id": process_id, "key": key}, 5.0)
        payload = reply.payload if reply is not None and reply.ok else {}
        peers = [Peer(p["process_id"], p["address"], p.get("transport"))
                 for p in payload.get("peers", []) if isinstance(p, dict) and p.get("address")]
        if peers or source != "peer" or not payload.get("ahead") or time.monotonic() > deadline:
            return peers
        await asyncio.sleep(PEER_WAIT_POLL_S)


def make_fill(key: str, peers: list[Peer], *, cache_dir: str, security: Security, report: WeightReport,
              fetch_config: FetchConfig = FetchConfig()) -> Callable[[Any, Path], None]:
    """The torch engine's `fill_weights`: peers first, then the checkpoint directory (a GGUF's converted
    one) for whatever they did not deliver. Runs in the engine-building thread (own event loop)."""

    def fill(model: Any, model_dir: Path) -> None:
        from dyn.engine.loader import Checkpoint

        started = time.perf_counter()
        report.key = key
        local = _local_manifest(cache_dir, key)
        result: FetchResult | None = None
        if peers:
            result = asyncio.run(fetch_weights(model.arena, peers, key=key, local_manifest=local,
                                               security=security, config=fetch_config))
            report.failures = list(result.failures)
            report.num_bytes, report.num_refetched = result.num_bytes, result.num_refetched
            report.transport = result.transport
            report.peer = ",".join(result.peers_used)
        if result is not None and result.complete:
            report.source = "peer"
            assert result.manifest is not None
            write_once(result.manifest, manifest_path(cache_dir, key))
        elif result is not None and result.have:
            report.source = "peer+disk"
            finish_from_disk(model, Checkpoint(model_dir), result.have)
        else:
            report.source = "disk"
            model.load(Checkpoint(model_dir))
        report.load_s = time.perf_counter() - started

    return fill


def finish_from_disk(model: Any, checkpoint: Any, have: set[int]) -> None:
    """Read only the checkpoint tensors that touch a block the peers did not deliver verified.

    Blocks outside `have` are zeroed first: a block that failed its checksum may hold junk in
    its padding, and padding is part of every block hash this worker will later serve."""
    arena = model.arena
    size = arena.layout.block_bytes
    for i in range(arena.layout.num_blocks):
        if i not in have:
            arena.data[i * size:(i + 1) * size].zero_()
    needed = {name for name, (offset, nbytes) in model.checkpoint_ranges().items()
              if any(b not in have for b in range(offset // size, (offset + max(nbytes, 1) - 1) // size + 1))}
    model.load(checkpoint, names=needed)


async def publish_manifest(arena: Any, report: WeightReport, *, cache_dir: str, engine: str) -> WeightManifest:
    """The manifest this worker serves: from the node's file when it matches our own bytes, else
    hashed from our arena (after a disk load; off the critical path, the engine already serves)."""
    local = _local_manifest(cache_dir, report.key)
    if report.source == "peer" and local is not None:
        return local
    mine = await asyncio.to_thread(build_manifest, arena, key=report.key, engine=engine)
    if local is not None and (local.block_hashes != mine.block_hashes or local.tensors != mine.tensors):
        log.warning("weights manifest %s differs from this worker's weights (checkpoint changed since it "
                    "was written?); serving peers with this worker's own", manifest_path(cache_dir, report.key))
    elif write_once(mine, manifest_path(cache_dir, report.key)):
        log.info("wrote weights manifest %s", manifest_path(cache_dir, report.key))
    return mine


def corrupt_hook_blocks() -> frozenset[int]:
    raw = os.environ.get(CORRUPT_HOOK_ENV, "")
    return frozenset(int(x) for x in raw.split(",") if x.strip().isdigit())


def process_age_s() -> float:
    """Seconds since this process started (kernel start time), so time-to-ready counts imports too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _local_manifest(cache_dir: str, key: str) -> WeightManifest | None:
    try:
        return read_manifest(manifest_path(cache_dir, key))
    except ManifestError as exc:
        log.warning("ignoring weights manifest: %s", exc)
        return None
