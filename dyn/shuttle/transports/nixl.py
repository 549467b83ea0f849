"""nixl: NVIDIA NIXL (UCX underneath: RDMA, or shm/tcp when that is all there is).

The receiver READs payloads straight from the sender's memory into its
destination views: no staging buffer on either side. The sender registers
only the blocks a transfer asked for (coalesced into runs) and deregisters
them when it ends, so a peer can never read anything else. Its agent
metadata rides in the first Blocks message; `handles` holds the source
address of each block.

Host memory only for now: CUDA pools use cuda_ipc inside a node.
Agents start on first use only: NIXL's progress thread polls without
sleeping (measured here: ~0.5 core per idle agent), so a worker that never
pulls over NIXL never pays for it. Imported
lazily; `is_available()` says whether the package is installed (the PyPI
build is `nixl-cu12`, importable as `nixl_cu12`, or `nixl`).
"""

from __future__ import annotations

import importlib.util

import asyncio
import importlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from dyn.shuttle.blocks import checksum, host_array, is_cuda
from dyn.shuttle.errors import TransferError
from dyn.shuttle.transports.base import RecvTransport, SendJob, SendTransport
from dyn.shuttle.wire import Blocks

_MODULES = ("nixl._api", "nixl_cu12._api")
_POLL_S = 0.0002


def is_available() -> bool:
    """Whether a NIXL package is installed, without importing it: importing pulls in torch and
    its CUDA libraries (~500 MB RSS), which a worker should pay only when it really sends."""
    return any(importlib.util.find_spec(name) is not None for name in ("nixl", "nixl_cu12"))


class NixlSender(SendTransport):
    name = "nixl"

    def __init__(self) -> None:
        self._agent: Any = None
        self._regs: dict[str, Any] = {}

    async def send(self, job: SendJob) -> None:
        if self._agent is None:  # lazily: an agent's progress thread costs CPU even when idle
            self._agent = _new_agent("dyn-tx")
        addrs = [_address(job.block_views[i], job.request_id, i) for i in job.block_idx]
        runs = _coalesce(addrs, job.block_bytes)
        try:
            self._regs[job.transfer_id] = self._agent.register_memory([(a, n, 0, "") for a, n in runs], "DRAM")
        except Exception as exc:  # the bindings raise their own nixlError types
            raise TransferError(f"NIXL could not register {len(runs)} regions: {exc}", reason="nixl",
                                request_id=job.request_id) from None
        metadata = self._agent.get_agent_metadata()
        pos = 0
        for seq, chunk in enumerate(job.chunks()):
            await job.spend(len(chunk) * job.block_bytes)
            msg = Blocks(transfer_id=job.transfer_id, seq=seq, block_idx=chunk,
                         block_hashes=[job.block_hashes[i] for i in chunk],
                         checksums=[checksum(host_array(job.block_views[i], writable=False)) for i in chunk],
                         handles=addrs[pos:pos + len(chunk)], metadata=metadata if seq == 0 else b"")
            pos += len(chunk)
            await job.send([msg])

    def release(self, job: SendJob) -> None:
        reg = self._regs.pop(job.transfer_id, None)
        if reg is not None:
            self._agent.deregister_memory(reg)

    def close(self) -> None:
        for reg in self._regs.values():
            self._agent.deregister_memory(reg)
        self._regs.clear()
        self._agent = None


class NixlReceiver(RecvTransport):
    name = "nixl"

    def __init__(self, xfer_timeout_s: float = 30.0) -> None:
        self._agent: Any = None
        self._remotes: dict[bytes, str] = {}
        self._current: dict[str, str] = {}
        self._xfer_timeout_s = xfer_timeout_s

    def prepare(self) -> None:
        if self._agent is None:
            self._agent = _new_agent("dyn-rx")

    async def deliver(self, msg: Blocks, frames: Sequence[Any], dest_views: Sequence[object],
                      block_bytes: int, request_id: str) -> None:
        self.prepare()
        if msg.metadata:
            if msg.metadata not in self._remotes:
                name = self._agent.add_remote_agent(msg.metadata)
                self._remotes[msg.metadata] = name.decode() if isinstance(name, bytes) else name
            self._current[msg.transfer_id] = self._remotes[msg.metadata]
        remote = self._current.get(msg.transfer_id)
        if remote is None or len(msg.handles) != len(msg.block_idx) or \
                not all(isinstance(h, int) for h in msg.handles):
            raise TransferError(f"nixl chunk {msg.seq} without agent metadata or source addresses",
                                reason="protocol", request_id=request_id)
        dests = [_address(v, request_id, i) for v, i in zip(dest_views, msg.block_idx)]
        reg = self._agent.register_memory([(a, n, 0, "") for a, n in _coalesce(dests, block_bytes)], "DRAM")
        try:
            local = self._agent.get_xfer_descs([(a, block_bytes, 0) for a in dests], "DRAM")
            source = self._agent.get_xfer_descs([(a, block_bytes, 0) for a in msg.handles], "DRAM")
            await self._read(local, source, remote, request_id)
        finally:
            self._agent.deregister_memory(reg)
        for view, idx, expected in zip(dest_views, msg.block_idx, msg.checksums):
            got = checksum(host_array(view, writable=True))
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


def _api() -> Any:
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        # NIXL logs INFO lines to stdout on every agent start; library code here never prints.
        logging.getLogger("nixl").setLevel(logging.WARNING)
        return module
    return None


def _new_agent(prefix: str) -> Any:
    api = _api()
    if api is None:
        raise TransferError("the nixl package is not installed (pip install nixl-cu12)", reason="nixl")
    return api.nixl_agent(f"{prefix}-{secrets.token_hex(6)}", api.nixl_agent_config(backends=["UCX"]))


def _address(view: object, request_id: str, idx: int) -> int:
    if is_cuda(view):
        raise TransferError("nixl transport here moves host memory only; use cuda_ipc for CUDA pools",
                            reason="bad_view", request_id=request_id, block_idx=idx)
    return int(host_array(view, writable=False).ctypes.data)


def _coalesce(addrs: list[int], block_bytes: int) -> list[tuple[int, int]]:
    """Adjacent blocks (common in a paged pool) become one registered region."""
    runs: list[list[int]] = []
    for addr in sorted(set(addrs)):
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += block_bytes
        else:
            runs.append([addr, block_bytes])
    return [(a, n) for a, n in runs]
