"""cuda_ipc: GPU to GPU inside one node (NVLink peers) through CUDA IPC handles.

The sender shares each CUDA storage its blocks live in once per transfer
(torch's IPC reduction: a cudaIpcMemHandle plus torch's producer-side ref
counting); the receiver opens it (cached by torch per handle) and copies
each block device-to-device into its destination view, which rides NVLink
when the GPUs are peers. Payload checksums are computed on the GPU on both
sides (xxh3 would need a round trip through host memory):

    checksum = sum_i word_i * (2i + 1)  mod 2**64,   word_i = int32 words of the block

Position-weighted, so flipped, lost and reordered words all change it.
Only imported when CUDA is present. Fabric handles across NVL72 trays are
not implemented (PathChoice never picks them unless told the platform has them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from dyn.shuttle.errors import TransferError
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.wire import Blocks

_U64 = (1 << 64) - 1


class CudaIpcSender(SendTransport):
    name = "cuda_ipc"

    async def send(self, job: SendJob) -> None:
        views = [job.block_views[i] for i in job.block_idx]
        for k, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or not view.is_cuda or view.dtype != torch.uint8:
                raise TransferError("cuda_ipc needs uint8 CUDA block views", reason="bad_view",
                                    request_id=job.request_id, block_idx=job.block_idx[k])
        storages: dict[int, int] = {}
        shared: list[list[Any]] = []
        places: list[list[int]] = []
        for view in views:
            key = view.untyped_storage().data_ptr()
            if key not in storages:
                storages[key] = len(shared)
                shared.append(_share_storage(view))
            places.append([storages[key], view.storage_offset()])
        if views:
            torch.cuda.synchronize(views[0].device)  # payloads are final before their handles leave
        metadata = msgpack.packb(shared, use_bin_type=True)
        pos = 0
        for seq, chunk in enumerate(job.chunks()):
            await job.spend(len(chunk) * job.block_bytes)
            msg = Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                         block_hashes=[job.block_hashes[i] for i in chunk],
                         checksums=gpu_checksums([job.block_views[i] for i in chunk]),  # type: ignore[misc]
                         handles=places[pos:pos + len(chunk)], metadata=metadata if seq == 0 else b"")
            pos += len(chunk)
            await job.send([msg])


class CudaIpcReceiver(RecvTransport):
    name = "cuda_ipc"

    def __init__(self) -> None:
        self._bases: dict[str, list[torch.Tensor]] = {}

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                      block_bytes: int, request_id: str) -> None:
        if msg.metadata:
            try:
                self._bases[msg.transfer_id] = [_open_storage(s) for s in msgpack.unpackb(msg.metadata)]
            except (RuntimeError, TypeError, ValueError) as exc:
                raise TransferError(f"cannot open the sender's CUDA IPC handles: {exc}", reason="protocol",
                                    request_id=request_id) from None
        bases = self._bases.get(msg.transfer_id)
        if bases is None or len(msg.handles) != len(msg.block_idx):
            raise TransferError(f"cuda_ipc chunk {msg.seq} without IPC handles", reason="protocol",
                                request_id=request_id)
        for view, (storage_idx, offset), idx in zip(dest_views, msg.handles, msg.block_idx):
            if not isinstance(view, torch.Tensor) or not view.is_cuda:
                raise TransferError("cuda_ipc needs CUDA destination views", reason="bad_view",
                                    request_id=request_id, block_idx=idx)
            base = bases[storage_idx]
            if not 0 <= offset <= base.numel() - block_bytes:
                raise TransferError(f"source offset {offset} outside the shared storage", reason="protocol",
                                    request_id=request_id, block_idx=idx)
            view.copy_(base[offset:offset + block_bytes], non_blocking=True)
        got = gpu_checksums(list(dest_views))  # type: ignore[arg-type]
        for value, expected, idx in zip(got, msg.checksums, msg.block_idx):
            if value != expected:
                raise TransferError(f"payload checksum {value:#018x} != promised {expected:#018x}",
                                    reason="checksum_mismatch", request_id=request_id, block_idx=idx)

    def finish(self, transfer_id: str) -> None:
        self._bases.pop(transfer_id, None)

    def close(self) -> None:
        self._bases.clear()


def gpu_checksums(views: list[torch.Tensor]) -> list[int]:
    """Position-weighted int32-word sums of each block, with one device sync for all."""
    if not views:
        return []
    sums = []
    for view in views:
        words = view.view(torch.int32) if view.numel() % 4 == 0 else view
        weights = torch.arange(1, 2 * words.numel(), 2, device=view.device, dtype=torch.int64)
        sums.append((words.to(torch.int64) * weights).sum())
    return [int(v) & _U64 for v in torch.stack(sums).tolist()]


def _share_storage(view: torch.Tensor) -> list[Any]:
    """IPC description of the whole storage under `view`, as msgpack-able fields."""
    base = torch.empty(0, dtype=torch.uint8, device=view.device).set_(view.untyped_storage())
    _, args = reduce_tensor(base)
    # args follow rebuild_cuda_tensor's signature; classes and dtype are implied.
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return [list(size), list(stride), offset, device, handle, storage_bytes, storage_offset,
            ref_handle, ref_offset, event_handle, event_sync]


def _open_storage(fields: list[Any]) -> torch.Tensor:
    (size, stride, offset, device, handle, storage_bytes, storage_offset,
     ref_handle, ref_offset, event_handle, event_sync) = fields
    return rebuild_cuda_tensor(torch.Tensor, tuple(size), tuple(stride), offset, torch.UntypedStorage,
                               torch.uint8, device, handle, storage_bytes, storage_offset, False,
                               ref_handle, ref_offset, event_handle, event_sync)
