"""NIXL with GPU memory: CUDA block views register as VRAM on their device and are read GPU to
GPU. The descriptor logic runs on CPU against a fake agent; the real VRAM pull is `gpu`."""

from __future__ import annotations

import asyncio
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dyn.shuttle import OfferDescriptor, ShuttleReceiver
from dyn.shuttle.errors import TransferError
from dyn.shuttle.transports import nixl
from dyn.shuttle.transports.cuda_ipc import gpu_checksums
from dyn.shuttle.transports.nixl import NixlReceiver, Place, parse_handle, register_regions
from dyn.shuttle.wire import Blocks

from shuttle_peer import make_blocks, read_offer

BLOCK_BYTES = 1 << 12


class _FakeCudaView:
    """What NIXL needs of a CUDA block view: pointer, device, contiguity (memory is host here)."""

    is_cuda = True

    def __init__(self, array: np.ndarray, device: int) -> None:
        self.array, self.device = array, SimpleNamespace(index=device)

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)

    def is_contiguous(self) -> bool:
        return True


class _FakeAgent:
    """Records registrations; a READ copies bytes between the (host) addresses it was given."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, list]] = []
        self.descs: list[tuple[str, list]] = []

    def register_memory(self, regions, mem):
        self.registered.append((mem, regions))
        return len(self.registered)

    def deregister_memory(self, reg):
        pass

    def add_remote_agent(self, metadata):
        return b"peer"

    def get_xfer_descs(self, descs, mem):
        self.descs.append((mem, descs))
        return descs

    def initialize_xfer(self, op, local, source, remote):
        assert op == "READ" and remote == "peer"
        return local, source

    def transfer(self, handle):
        for (dst, n, _), (src, m, _) in zip(*handle):
            assert n == m
            ctypes.memmove(dst, src, n)
        return "DONE"

    def release_xfer_handle(self, handle):
        pass


def test_vram_handles_round_trip_and_register_per_device() -> None:
    places = [Place(0x1000, "VRAM", 1), Place(0x2000, "VRAM", 1), Place(0x1000 + 512, "VRAM", 1),
              Place(0x9000, "VRAM", 0), Place(0x5000, "DRAM", 0)]
    assert [parse_handle(p.handle) for p in places] == places
    assert places[4].handle == 0x5000  # DRAM handles stay plain addresses (older peers read them)
    for bad in (-1, True, [1], [1, -2], "0x10", [0, 1]):
        assert parse_handle(bad) is None
    assert register_regions(places, 512) == {("DRAM", 0): [(0x5000, 512)], ("VRAM", 0): [(0x9000, 512)],
                                             ("VRAM", 1): [(0x1000, 1024), (0x2000, 512)]}


def test_a_vram_chunk_registers_vram_descriptors_and_checks_the_gpu_checksum() -> None:
    source = make_blocks(3, 4, BLOCK_BYTES)[1]
    dest = np.zeros_like(source)
    src_views = [_FakeCudaView(source[i], device=2) for i in range(4)]
    dest_views = [_FakeCudaView(dest[i], device=0) for i in range(4)]
    good = gpu_checksums([torch.from_numpy(source[i]) for i in range(4)])

    def msg(checksums):
        return Blocks(transfer_id="t", seq=0, block_idx=[0, 1, 2, 3], block_hashes=[1, 2, 3, 4],
                      checksums=checksums, handles=[nixl._place(v, "r", i).handle for i, v in enumerate(src_views)],
                      metadata=b"meta")

    async def deliver(checksums):
        rx = NixlReceiver()
        rx._agent = agent = _FakeAgent()
        await rx.deliver(msg(checksums), [], dest_views, BLOCK_BYTES, "r")
        return agent

    # _FakeCudaView has no .view(): the receiver sums the landed bytes as a host tensor would
    nixl_checksums = nixl._checksums
    nixl._checksums = lambda views, vram: nixl_checksums(
        [torch.from_numpy(v.array) if isinstance(v, _FakeCudaView) else v for v in views], vram=vram)
    try:
        agent = asyncio.run(deliver(good))
        assert np.array_equal(dest, source)
        assert agent.registered == [("VRAM", [(dest_views[0].data_ptr(), 4 * BLOCK_BYTES, 0, "")])]
        assert [(mem, [d[2] for d in descs]) for mem, descs in agent.descs] == [("VRAM", [0] * 4),
                                                                                ("VRAM", [2] * 4)]
        dest[:] = 0
        with pytest.raises(TransferError) as info:
            asyncio.run(deliver([good[0] ^ 1, *good[1:]]))
        assert info.value.reason == "checksum_mismatch" and info.value.block_idx == 0
    finally:
        nixl._checksums = nixl_checksums


@pytest.mark.parametrize("dest_device", ["cuda", "cpu"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not nixl.is_available(), reason="needs nixl (pip install nixl-cu12)")
def test_nixl_moves_vram_blocks_bit_exact(spawn_peer, dest_device) -> None:
    num_blocks, block_bytes = 16, 1 << 16
    sender = spawn_peer("sender", "--seed", "9", "--num-blocks", str(num_blocks), "--block-bytes",
                        str(block_bytes), "--device", "cuda", "--transports", "nixl")
    desc = OfferDescriptor.from_dict(read_offer(sender))
    expected = torch.from_numpy(make_blocks(9, num_blocks, block_bytes)[1])
    dest = torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device=dest_device)
    missing = list(range(1, num_blocks))

    async def pull():
        async with ShuttleReceiver() as rx:
            return await rx.pull(desc, missing, [dest[i] for i in missing], 60, transport="nixl")

    stats = asyncio.run(pull())
    assert stats.transport == "nixl" and stats.num_blocks == len(missing)
    assert torch.equal(dest[missing].cpu(), expected[missing]) and not dest[0].any()
