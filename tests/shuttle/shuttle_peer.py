"""A shuttle peer in its own process, for cross-process tests (not collected by pytest).

    sender:   prints its offer descriptor (JSON) on stdout, serves until stdin closes
    receiver: pulls the offer given as JSON, prints the payload checksum of the result

`--die-after-chunks K` makes the process SIGKILL itself after K chunks, to
test transfers that break halfway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys

import numpy as np

from dyn.shuttle import OfferDescriptor, ReceiverConfig, SenderConfig, ShuttleReceiver, ShuttleSender
from dyn.shuttle.transports.base import RecvTransport
from dyn.shuttle.wire import Blocks


def read_offer(proc: subprocess.Popen[str]) -> dict:
    """A sender peer's first stdout line: its offer descriptor."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"peer exited early: {proc.communicate(timeout=5)[1]}")
    return json.loads(line)


def make_blocks(seed: int, num_blocks: int, block_bytes: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    hashes = [int(h) for h in rng.integers(0, 2**63, num_blocks, dtype=np.int64)]
    return hashes, rng.integers(0, 256, (num_blocks, block_bytes), dtype=np.uint8)


async def run_sender(args: argparse.Namespace) -> None:
    hashes, blocks = make_blocks(args.seed, args.num_blocks, args.block_bytes)
    config = SenderConfig(chunk_bytes=args.chunk_bytes, ring_bytes=args.ring_bytes, stall_timeout_s=3.0,
                          transports=tuple(dict.fromkeys(args.transports)))
    async with ShuttleSender(args.block_bytes, config=config) as sender:
        if args.die_after_chunks >= 0:
            _die_after(sender, args.die_after_chunks)
        if args.device == "cuda":
            import torch

            pool = torch.from_numpy(blocks).cuda()
            views: list[object] = [pool[i] for i in range(len(pool))]
        else:
            views = [memoryview(b) for b in blocks]
        offer = sender.offer(f"req-{args.seed}", hashes, views)
        print(json.dumps(offer.descriptor.to_dict()), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run_receiver(args: argparse.Namespace) -> None:
    desc = OfferDescriptor.from_dict(json.loads(args.offer))
    dest = np.zeros((len(desc.block_hashes), desc.block_bytes), dtype=np.uint8)
    # A receiver that dies after K chunks reads through the ring: a direct read has no chunks.
    shm_mode = "ring" if args.die_after_chunks >= 0 else "direct"
    async with ShuttleReceiver(config=ReceiverConfig(credit_bytes=args.chunk_bytes, shm_mode=shm_mode)) as rx:
        if args.die_after_chunks >= 0:
            for name in ("shm", "tcp", "nixl"):
                rx._transports[name] = _DyingReceiver(name, args.die_after_chunks)
        rx.prepare([args.transport])
        idx = list(range(len(desc.block_hashes)))
        await rx.pull(desc, idx, [memoryview(d) for d in dest], timeout_s=20, transport=args.transport)
    print(json.dumps({"ok": True}), flush=True)


def _die_after(sender: ShuttleSender, num_chunks: int) -> None:
    real_send = sender._send
    sent = 0

    async def send(identity: bytes, parts: list[object]) -> None:
        nonlocal sent
        if isinstance(parts[0], Blocks):
            if sent == num_chunks:
                os.kill(os.getpid(), signal.SIGKILL)
            sent += 1
        await real_send(identity, parts)

    sender._send = send  # type: ignore[method-assign]


class _DyingReceiver(RecvTransport):
    def __init__(self, name: str, num_chunks: int) -> None:
        from dyn.shuttle.transports import make_receiver

        self.name = name
        self._inner = make_receiver(name)
        self._left = num_chunks

    def prepare(self) -> None:
        self._inner.prepare()

    async def deliver(self, msg, frames, dest_views, block_bytes, request_id) -> None:  # type: ignore[no-untyped-def]
        if self._left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        self._left -= 1
        await self._inner.deliver(msg, frames, dest_views, block_bytes, request_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["sender", "receiver"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-blocks", type=int, default=32)
    parser.add_argument("--block-bytes", type=int, default=1 << 16)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 18)
    parser.add_argument("--ring-bytes", type=int, default=1 << 20)
    parser.add_argument("--die-after-chunks", type=int, default=-1)
    parser.add_argument("--offer", default="")
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--transports", nargs="+", default=["shm", "tcp"])
    args = parser.parse_args()
    asyncio.run(run_sender(args) if args.role == "sender" else run_receiver(args))


if __name__ == "__main__":
    main()
