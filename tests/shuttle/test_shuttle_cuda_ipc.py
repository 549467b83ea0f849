"""cuda_ipc: CUDA blocks between processes through IPC handles (GPU only), and its checksum."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from dyn.shuttle import OfferDescriptor, ShuttleReceiver, TransferError
from dyn.shuttle.transports.cuda_ipc import gpu_checksums

from shuttle_peer import make_blocks, read_offer

BLOCK_BYTES = 1 << 16
NUM_BLOCKS = 24


def test_gpu_checksum_sees_flips_and_swaps() -> None:
    data = torch.from_numpy(make_blocks(0, 2, BLOCK_BYTES)[1])
    base = gpu_checksums([data[0], data[1]])
    flipped = data.clone()
    flipped[0, 1000] ^= 1
    swapped = data[0].clone().view(torch.int32)
    swapped[[3, 4]] = swapped[[4, 3]]
    assert gpu_checksums([flipped[0], flipped[1]]) == [gpu_checksums([flipped[0]])[0], base[1]]
    assert gpu_checksums([flipped[0]])[0] != base[0]
    assert gpu_checksums([swapped.view(torch.uint8)])[0] != base[0]
    assert all(0 <= v < 2**64 for v in base)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blocks_arrive_bit_exact_over_ipc(spawn_peer) -> None:
    sender = spawn_peer("sender", "--seed", "5", "--num-blocks", str(NUM_BLOCKS), "--block-bytes",
                        str(BLOCK_BYTES), "--device", "cuda", "--transports", "cuda_ipc", "tcp")
    desc = OfferDescriptor.from_dict(read_offer(sender))
    expected = torch.from_numpy(make_blocks(5, NUM_BLOCKS, BLOCK_BYTES)[1])
    dest = torch.zeros((NUM_BLOCKS, BLOCK_BYTES), dtype=torch.uint8, device="cuda")
    missing = list(range(2, NUM_BLOCKS))

    async def pull():
        async with ShuttleReceiver() as rx:
            assert rx.pick_transport(desc, [dest[0]]) == "cuda_ipc"
            return await rx.pull(desc, missing, [dest[i] for i in missing], 20)

    stats = asyncio.run(pull())
    assert stats.transport == "cuda_ipc" and stats.num_blocks == len(missing)
    assert torch.equal(dest[missing].cpu(), expected[missing]) and not dest[:2].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_refuses_host_destinations(spawn_peer) -> None:
    sender = spawn_peer("sender", "--seed", "6", "--num-blocks", "4", "--block-bytes", str(BLOCK_BYTES),
                        "--device", "cuda", "--transports", "cuda_ipc")
    desc = OfferDescriptor.from_dict(read_offer(sender))
    host = np.zeros((1, BLOCK_BYTES), dtype=np.uint8)

    async def pull():
        async with ShuttleReceiver() as rx:
            await rx.pull(desc, [0], [memoryview(host[0])], 10, transport="cuda_ipc")

    with pytest.raises(TransferError, match="CUDA destination views"):
        asyncio.run(pull())
