"""Copies between block views of any kind without importing torch for host memory.

A block view is a writable 1-D uint8 `memoryview` (host pools) or a uint8
torch tensor (CUDA pools); tiers and the shuttle keep host bytes in numpy.
"""

from __future__ import annotations

import numpy as np


def as_array(view: object) -> np.ndarray:
    """A zero-copy uint8 numpy view of a host buffer (memoryview, bytes, bytearray, ndarray)."""
    if isinstance(view, np.ndarray):
        return view.reshape(-1).view(np.uint8)
    return np.frombuffer(view, dtype=np.uint8)


def copy_into(dst: object, src: object) -> None:
    """dst[:] = src for host buffers and torch tensors (CPU or CUDA) alike."""
    if _is_tensor(dst):
        import torch

        source = src if _is_tensor(src) else torch.from_numpy(as_array(src))
        dst.copy_(source, non_blocking=False)
        return
    target = as_array(dst)
    if _is_tensor(src):
        target[:] = src.cpu().numpy()
        return
    np.copyto(target, as_array(src))


def nbytes(view: object) -> int:
    if _is_tensor(view):
        return view.numel() * view.element_size()
    return memoryview(view).nbytes if not isinstance(view, np.ndarray) else view.nbytes


def _is_tensor(obj: object) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "copy_")
