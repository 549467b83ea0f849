"""Transport registry: name -> sender/receiver halves, optional ones imported lazily."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from dyn.shuttle.transports.base import RecvTransport, SendTransport

if TYPE_CHECKING:
    from dyn.shuttle.sender import SenderConfig


def make_senders(names: Iterable[str], block_bytes: int, config: "SenderConfig") -> dict[str, SendTransport]:
    out: dict[str, SendTransport] = {}
    for name in names:
        if name == "tcp":
            from dyn.shuttle.transports.tcp import TcpSender

            out[name] = TcpSender()
        elif name == "shm":
            from dyn.shuttle.transports.shm import ShmSender

            out[name] = ShmSender(block_bytes, config.ring_bytes, config.chunk_bytes)
        elif name == "cuda_ipc":
            from dyn.shuttle.transports.cuda_ipc import CudaIpcSender

            out[name] = CudaIpcSender()
        elif name == "nixl":
            from dyn.shuttle.transports.nixl import NixlSender

            out[name] = NixlSender()
        else:
            raise ValueError(f"unknown shuttle transport {name!r} (known: shm, tcp, cuda_ipc, nixl)")
    return out


def make_receiver(name: str) -> RecvTransport:
    if name == "tcp":
        from dyn.shuttle.transports.tcp import TcpReceiver

        return TcpReceiver()
    if name == "shm":
        from dyn.shuttle.transports.shm import ShmReceiver

        return ShmReceiver()
    if name == "cuda_ipc":
        from dyn.shuttle.transports.cuda_ipc import CudaIpcReceiver

        return CudaIpcReceiver()
    if name == "nixl":
        from dyn.shuttle.transports.nixl import NixlReceiver

        return NixlReceiver()
    raise ValueError(f"unknown shuttle transport {name!r} (known: shm, tcp, cuda_ipc, nixl)")
