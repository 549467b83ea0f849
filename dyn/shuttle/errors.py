"""Errors of the KV shuttle, with the fields a worker needs to react.

A failed hand-off is always local to one request: the decode worker cancels
that import and prefills locally; the sender unpins that offer. Nothing else
is affected.
"""

from __future__ import annotations

from dyn.errors import ShuttleError


class TransferError(ShuttleError):
    """One transfer failed: broken stream, wrong hash or checksum, timeout, rejection.

    `request_id` names the hand-off, `peer` the other side's address,
    `block_idx` the offending block (index into the offered hashes) when one
    block is at fault, `reason` a short machine-friendly kind ("timeout",
    "hash_mismatch", "checksum_mismatch", "rejected", "protocol", "aborted").
    """

    def __init__(self, message: str, *, reason: str, request_id: str | None = None,
                 peer: str | None = None, block_idx: int | None = None) -> None:
        self.reason = reason
        self.request_id = request_id
        self.peer = peer
        self.block_idx = block_idx
        where = []
        if request_id is not None:
            where.append(f"request {request_id!r}")
        if peer:
            where.append(f"peer {peer}")
        if block_idx is not None:
            where.append(f"block {block_idx}")
        prefix = f"KV transfer ({', '.join(where)}): " if where else "KV transfer: "
        super().__init__(prefix + message)


class PathError(ShuttleError):
    """No transport can connect two workers as asked (e.g. a forced shm across hosts)."""

    def __init__(self, message: str, *, src: str | None = None, dst: str | None = None,
                 transport: str | None = None) -> None:
        self.src = src
        self.dst = dst
        self.transport = transport
        super().__init__(message)
