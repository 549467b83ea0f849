"""tcp: payloads as ZMQ frames sent zero-copy from the pinned source views.

The sender hands libzmq a reference to each block view (copy=False), so the
only copies are the kernel's and the receiver's one copy into its
destination view. In-flight bytes are bounded by the receiver's credit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dyn.shuttle.blocks import checksum, read_block, write_verified
from dyn.shuttle.errors import TransferError
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.wire import Blocks


class TcpSender(SendTransport):
    name = "tcp"

    async def send(self, job: SendJob) -> None:
        for seq, chunk in enumerate(job.chunks()):
            await job.spend(len(chunk) * job.block_bytes)
            payloads = [read_block(job.block_views[i]) for i in chunk]
            msg = Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                         block_hashes=[job.block_hashes[i] for i in chunk],
                         checksums=[checksum(p) for p in payloads])
            await job.send([msg, *payloads])


class TcpReceiver(RecvTransport):
    name = "tcp"

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                block_bytes: int, request_id: str) -> None:
        if len(frames) != len(msg.block_idx):
            raise TransferError(f"chunk {msg.seq} announced {len(msg.block_idx)} blocks but carried "
                                f"{len(frames)} payload frames", reason="protocol", request_id=request_id)
        for frame, view, idx, expected in zip(frames, dest_views, msg.block_idx, msg.checksums):
            payload = np.frombuffer(frame.buffer, dtype=np.uint8)
            write_verified(view, payload, expected, block_idx=idx, request_id=request_id)
