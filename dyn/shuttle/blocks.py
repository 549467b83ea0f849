"""Block views as numpy arrays, and payload checksums.

A block view (dyn.engine.backend) is a `memoryview` over host memory or a
1-D uint8 torch tensor. Host transports move bytes through numpy, which
shares memory with both; CUDA tensors are staged through host memory.

The block *hash* names KV content by its tokens, not its bytes, so a payload
that crosses a wire (tcp, nixl, shm's "ring+xxh3_64" mode) also carries a
checksum: xxh3_64 runs at ~18 GB/s here against ~2.5 GB/s for zlib.crc32.
shm's fenced modes need none (dyn.shuttle.wire).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from dyn.shuttle.errors import TransferError

CHECKSUM = "xxh3_64"


def checksum(data: np.ndarray | memoryview) -> int:
    """xxh3_64 of a payload, as an unsigned 64-bit int."""
    return xxhash.xxh3_64_intdigest(data)


ONE_PASS_PIECE_BYTES = 256 << 10
"""Blocks larger than ONE_PASS_ABOVE_BYTES are copied and hashed in pieces of this size: each
piece is hashed right after it is copied, while it is still in the core's L2."""
ONE_PASS_ABOVE_BYTES = 1 << 20
"""A block up to this size (one core's L2 here) is still cache-resident when a whole-block
copy finishes, so copy-then-hash is already one trip through memory and costs fewer calls."""


def copy_checksum(dest: np.ndarray, src: np.ndarray) -> int:
    """Copy `src` into `dest` and return the xxh3_64 of what landed in `dest`, in one pass over
    memory: a multi-MiB block (a 70B model's KV block is ~5 MiB) is hashed piece by piece right
    behind the copy instead of being read back from DRAM after it. Same digest as `checksum`."""
    size = dest.size
    if size <= ONE_PASS_ABOVE_BYTES:
        np.copyto(dest, src, casting="no")
        return xxhash.xxh3_64_intdigest(dest)
    state = xxhash.xxh3_64()
    for start in range(0, size, ONE_PASS_PIECE_BYTES):
        piece = dest[start:start + ONE_PASS_PIECE_BYTES]
        np.copyto(piece, src[start:start + ONE_PASS_PIECE_BYTES], casting="no")
        state.update(piece)
    return state.intdigest()


def is_cuda(view: object) -> bool:
    return getattr(view, "is_cuda", False) is True


def host_array(view: object, *, writable: bool) -> np.ndarray:
    """A 1-D uint8 numpy array sharing memory with a host block view."""
    if isinstance(view, memoryview):
        if writable and view.readonly:
            raise TypeError("block view is read-only")
        return np.frombuffer(view.cast("B") if view.format != "B" else view, dtype=np.uint8)
    if isinstance(view, (bytearray, np.ndarray)):
        return np.frombuffer(view, dtype=np.uint8) if isinstance(view, bytearray) else view.reshape(-1)
    numpy = getattr(view, "numpy", None)
    if numpy is not None and not is_cuda(view):
        return numpy().reshape(-1).view(np.uint8)
    raise TypeError(f"unsupported block view type {type(view).__name__}")


def read_block(view: object) -> np.ndarray:
    """The payload of a source view as host bytes (a copy only for CUDA tensors)."""
    if is_cuda(view):
        return view.contiguous().cpu().numpy().reshape(-1).view(np.uint8)  # type: ignore[attr-defined]
    return host_array(view, writable=False)


def write_block(view: object, payload: np.ndarray) -> None:
    """Copy `payload` into a destination view (one copy; host->device for CUDA)."""
    if is_cuda(view):
        import torch

        view.copy_(torch.from_numpy(payload), non_blocking=False)  # type: ignore[attr-defined]
        return
    np.copyto(host_array(view, writable=True), payload, casting="no")


def write_verified(view: object, payload: np.ndarray, expected: int, *, block_idx: int,
                   request_id: str | None) -> None:
    """Write a payload and prove it landed intact (hash the destination, not the source)."""
    if payload.size != _nbytes(view):
        raise TransferError(f"payload of {payload.size} bytes for a {_nbytes(view)}-byte block",
                            reason="protocol", request_id=request_id, block_idx=block_idx)
    if is_cuda(view):
        got = checksum(payload)
        write_block(view, payload)
    else:
        got = copy_checksum(host_array(view, writable=True), payload)
    if got != expected:
        raise TransferError(f"payload checksum {got:#018x} != promised {expected:#018x}",
                            reason="checksum_mismatch", request_id=request_id, block_idx=block_idx)


def check_views(views: Sequence[object], block_bytes: int, what: str, *,
                request_id: str | None = None) -> None:
    """Every view must be a contiguous 1-D byte region of exactly block_bytes."""
    for i, view in enumerate(views):
        size = _nbytes(view)
        if size is None:
            raise TransferError(f"{what}[{i}] is a {type(view).__name__}, not a block view "
                                f"(memoryview or uint8 tensor)", reason="bad_view",
                                request_id=request_id)
        if size != block_bytes:
            raise TransferError(f"{what}[{i}] holds {size} bytes, expected block_bytes={block_bytes}",
                                reason="bad_view", request_id=request_id)


def _nbytes(view: object) -> int | None:
    if isinstance(view, memoryview):
        return view.nbytes if view.c_contiguous else None
    if isinstance(view, (bytearray, np.ndarray)):
        return len(view) if isinstance(view, bytearray) else (view.nbytes if view.flags.c_contiguous else None)
    element_size = getattr(view, "element_size", None)
    if element_size is not None and getattr(view, "is_contiguous", lambda: False)():
        return view.numel() * element_size()  # type: ignore[attr-defined]
    return None
