"""nixl: NVIDIA NIXL (UCX underneath: RDMA, or shm/tcp when that is all there is).

The receiver READs payloads straight from the sender's memory into its
destination views: no staging buffer on either side. The sender registers
only the blocks a transfer asked for (coalesced into runs) and deregisters
them when it ends, so a peer can never read anything else. Its agent
metadata rides in the first Blocks message; `handles` holds the source
address of each block.

Host (DRAM) and GPU (VRAM) blocks alike: a CUDA view registers as VRAM on
its device, so with UCX's cuda transports (or GPUDirect RDMA) the bytes go
GPU to GPU; that is the path between trays of one NVL72 domain (UCX over
multi-node NVLink) and across domains. A source handle is the block's address
(DRAM) or [address, device] (VRAM). A VRAM source's checksums are cuda_ipc's
GPU checksum (position-weighted word sums, no trip through host memory); the
receiver recomputes the same sum where the block landed (GPU or host), so the
kind of the source handle says which checksum the chunk carries.
Agents start when a worker starts whose topology has a path over NIXL
(`prepare`, dyn.worker.process_startup), else on first use, so a worker that
never pulls over NIXL never pays for one (each has a progress thread, made to
sleep between UCX events: dyn.shuttle.transports.nixl_progress). Imported
lazily; `is_available()` says whether the package is installed (the PyPI
builds are `nixl-cu12`/`nixl-cu13`, importable as `nixl_cu12`/`nixl_cu13`,
and the `nixl` meta package over them). With one backend installed it is
imported directly: the meta package's CUDA probe imports torch (2.2 s of the
2.4 s import measured here; 10.8 s once on a 2-core host at load average 11).
"""

from __future__ import annotations

import importlib.util

import asyncio
import importlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from dyn.shuttle.blocks import checksum, host_array, is_cuda, read_block
from dyn.shuttle.errors import TransferError
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.transports.nixl_progress import quiet_progress_threads
from dyn.shuttle.wire import Blocks

_BACKENDS = ("nixl_cu13", "nixl_cu12", "nixl_rocm")
_POLL_S = 0.0002


def is_available() -> bool:
    """Whether a NIXL package is installed, without importing it: importing loads UCX (and,
    through the `nixl` meta package, torch: ~500 MB RSS), which a worker should pay only when
    it may send over NIXL."""
    return any(importlib.util.find_spec(name) is not None for name in ("nixl", *_BACKENDS))


def _api_modules() -> tuple[str, ...]:
    """Where to import NIXL's API from, first choice first: the one installed backend itself,
    else the meta package (it picks among several by the CUDA version)."""
    installed = [name for name in _BACKENDS if importlib.util.find_spec(name) is not None]
    if len(installed) == 1:
        return (f"{installed[0]}._api", "nixl._api")
    return ("nixl._api", *(f"{name}._api" for name in installed))


class _LazyAgent:
    """An agent made by prepare(), or else on first use, off the event loop, once however many
    transfers ask at once."""

    _prefix = "dyn"

    def __init__(self) -> None:
        self._agent: Any = None
        self._starting = asyncio.Lock()

    async def _started(self) -> Any:
        if self._agent is None:
            async with self._starting:
                if self._agent is None:
                    self._agent = await asyncio.to_thread(_new_agent, self._prefix)
        return self._agent

    def prepare(self) -> None:
        """Start the agent now (blocking: importing NIXL and starting UCX take ~3 s on a small
        host), so the first hand-off does not wait for it."""
        if self._agent is None:
            self._agent = _new_agent(self._prefix)


class NixlSender(_LazyAgent, SendTransport):
    name = "nixl"
    _prefix = "dyn-tx"

    def __init__(self) -> None:
        super().__init__()
        self._regs: dict[str, list[Any]] = {}

    async def send(self, job: SendJob) -> None:
        await self._started()
        places = [_place(job.block_views[i], job.request_id, i) for i in job.block_idx]
        try:
            self._regs[job.transfer_id] = _register(self._agent, places, job.block_bytes)
        except Exception as exc:  # the bindings raise their own nixlError types
            raise TransferError(f"NIXL could not register {len(places)} blocks "
                                f"({', '.join(sorted({p.mem for p in places}))}): {exc}", reason="nixl",
                                request_id=job.request_id) from None
        metadata = self._agent.get_agent_metadata()
        pos = 0
        for seq, chunk in enumerate(job.chunks()):
            await job.spend(len(chunk) * job.block_bytes)
            msg = Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                         block_hashes=[job.block_hashes[i] for i in chunk],
                         checksums=_checksums([job.block_views[i] for i in chunk],
                                              vram=places[pos].mem == "VRAM"),
                         handles=[p.handle for p in places[pos:pos + len(chunk)]],
                         metadata=metadata if seq == 0 else b"")
            pos += len(chunk)
            await job.send([msg])

    def release(self, job: SendJob) -> None:
        for reg in self._regs.pop(job.transfer_id, []):
            self._agent.deregister_memory(reg)

    def close(self) -> None:
        for regs in self._regs.values():
            for reg in regs:
                self._agent.deregister_memory(reg)
        self._regs.clear()
        self._agent = None


class NixlReceiver(_LazyAgent, RecvTransport):
    name = "nixl"
    _prefix = "dyn-rx"

    def __init__(self, xfer_timeout_s: float = 30.0) -> None:
        super().__init__()
        self._remotes: dict[bytes, str] = {}
        self._current: dict[str, str] = {}
        self._xfer_timeout_s = xfer_timeout_s

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                      block_bytes: int, request_id: str) -> None:
        await self._started()
        if msg.metadata:
            if msg.metadata not in self._remotes:
                name = self._agent.add_remote_agent(msg.metadata)
                self._remotes[msg.metadata] = name.decode() if isinstance(name, bytes) else name
            self._current[msg.transfer_id] = self._remotes[msg.metadata]
        remote = self._current.get(msg.transfer_id)
        sources = [parse_handle(h) for h in msg.handles]
        if remote is None or len(sources) != len(msg.block_idx) or None in sources:
            raise TransferError(f"nixl chunk {msg.seq} without agent metadata or source addresses",
                                reason="protocol", request_id=request_id)
        dests = [_place(v, request_id, i) for v, i in zip(dest_views, msg.block_idx)]
        for what, places in (("source", sources), ("destination", dests)):
            if len({(p.mem, p.device) for p in places}) != 1:  # one descriptor list = one memory kind
                raise TransferError(f"nixl chunk {msg.seq}: {what} blocks span several memories",
                                    reason="protocol", request_id=request_id)
        regs = _register(self._agent, dests, block_bytes)
        try:
            local = _xfer_descs(self._agent, dests, block_bytes)
            source = _xfer_descs(self._agent, sources, block_bytes)  # type: ignore[arg-type]
            await self._read(local, source, remote, request_id)
        finally:
            for reg in regs:
                self._agent.deregister_memory(reg)
        landed = _checksums(list(dest_views), vram=sources[0].mem == "VRAM")  # type: ignore[union-attr]
        for got, idx, expected in zip(landed, msg.block_idx, msg.checksums):
            if got != expected:
                raise TransferError(f"payload checksum {got:#018x} != promised {expected:#018x}",
                                    reason="checksum_mismatch", request_id=request_id, block_idx=idx)

    async def _read(self, local: Any, source: Any, remote: str, request_id: str) -> None:
        try:
            handle = self._agent.initialize_xfer("READ", local, source, remote)
        except Exception as exc:  # nixlError subclasses; the source may be deregistered already
            raise TransferError(f"NIXL refused the read: {exc}", reason="nixl", request_id=request_id) from None
        try:
            state = self._agent.transfer(handle)
            deadline = time.monotonic() + self._xfer_timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"NIXL read not done after {self._xfer_timeout_s:.0f}s",
                                        reason="timeout", request_id=request_id)
                await asyncio.sleep(_POLL_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL read failed ({state})", reason="nixl", request_id=request_id)
        finally:
            self._agent.release_xfer_handle(handle)

    def finish(self, transfer_id: str) -> None:
        self._current.pop(transfer_id, None)

    def close(self) -> None:
        self._agent = None
        self._remotes.clear()
        self._current.clear()


def load_api() -> Any:
    """NIXL's Python API module (None: not installed), set up for this process: agents made
    from now on poll instead of spinning (dyn.shuttle.transports.nixl_progress), and NIXL's
    INFO lines stay out of stdout (it logs one on every agent start; library code never prints)."""
    for name in _api_modules():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        logging.getLogger("nixl").setLevel(logging.WARNING)
        quiet_progress_threads(module)
        return module
    return None


def _new_agent(prefix: str) -> Any:
    api = load_api()
    if api is None:
        raise TransferError("the nixl package is not installed (pip install nixl-cu12)", reason="nixl")
    return api.nixl_agent(f"{prefix}-{secrets.token_hex(6)}", api.nixl_agent_config(backends=["UCX"]))


class Place(NamedTuple):
    """Where one block lives, as NIXL names memory."""

    address: int
    mem: str
    """"DRAM" or "VRAM"."""
    device: int
    """CUDA device index for VRAM; 0 for DRAM."""

    @property
    def handle(self) -> Any:
        """On the wire: the address alone for DRAM (what older senders sent), [address, device] for VRAM."""
        return self.address if self.mem == "DRAM" else [self.address, self.device]


def parse_handle(handle: Any) -> Place | None:
    """A source handle from the wire; None when malformed."""
    if isinstance(handle, int) and not isinstance(handle, bool) and handle > 0:
        return Place(handle, "DRAM", 0)
    if isinstance(handle, (list, tuple)) and len(handle) == 2 and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in handle) and handle[0] > 0 and handle[1] >= 0:
        return Place(handle[0], "VRAM", handle[1])
    return None


def _place(view: object, request_id: str, idx: int) -> Place:
    if is_cuda(view):
        if not view.is_contiguous():  # type: ignore[attr-defined]
            raise TransferError("a CUDA block view must be contiguous for NIXL", reason="bad_view",
                                request_id=request_id, block_idx=idx)
        return Place(int(view.data_ptr()), "VRAM", int(view.device.index or 0))  # type: ignore[attr-defined]
    return Place(int(host_array(view, writable=False).ctypes.data), "DRAM", 0)


def register_regions(places: Sequence[Place], block_bytes: int) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Coalesced (address, length) runs per (memory kind, device): one registration each."""
    by_memory: dict[tuple[str, int], list[int]] = {}
    for p in places:
        by_memory.setdefault((p.mem, p.device), []).append(p.address)
    return {key: _coalesce(addrs, block_bytes) for key, addrs in sorted(by_memory.items())}


def _checksums(views: list[object], *, vram: bool) -> list[int]:
    """xxh3 of DRAM-sourced blocks; the GPU checksum (computed on the block's own device, or
    with torch on the host for a host destination) of VRAM-sourced ones."""
    if not vram:
        return [checksum(read_block(view)) for view in views]
    import torch

    from dyn.shuttle.transports.cuda_ipc import gpu_checksums

    return gpu_checksums([v if is_cuda(v) else torch.from_numpy(host_array(v, writable=False)) for v in views])


def _register(agent: Any, places: Sequence[Place], block_bytes: int) -> list[Any]:
    regs = []
    try:
        for (mem, device), runs in register_regions(places, block_bytes).items():
            regs.append(agent.register_memory([(a, n, device, "") for a, n in runs], mem))
    except Exception:
        for reg in regs:
            agent.deregister_memory(reg)
        raise
    return regs


def _xfer_descs(agent: Any, places: Sequence[Place], block_bytes: int) -> Any:
    return agent.get_xfer_descs([(p.address, block_bytes, p.device) for p in places], places[0].mem)


def _coalesce(addrs: list[int], block_bytes: int) -> list[tuple[int, int]]:
    """Adjacent blocks (common in a paged pool) become one registered region."""
    runs: list[list[int]] = []
    for addr in sorted(set(addrs)):
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += block_bytes
        else:
            runs.append([addr, block_bytes])
    return [(a, n) for a, n in runs]
