"""One flat byte arena holding every weight of a model, cut into fixed-size blocks.

    arena (uint8, zero-filled, on the model's device)
    | embed | pad | norm | pad | lm_head | ... | layers.N.down | pad to block |
    |<- block 0 ->|<- block 1 ->| ...                         |<- block B-1 ->|

Each weight is a typed view at an aligned offset, so the engine computes on
the arena directly and a peer can move the whole model as B equal blocks (the
shuttle's unit) straight into place, with no staging copy and no per-tensor
framing. Offsets depend only on names, shapes and dtype, so two workers with
the same model, dtype and shard layout agree on every byte, padding included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

ALIGN_BYTES = 256
"""Tensor start alignment (CUDA's allocation granularity for coalesced loads)."""
SMALL_BLOCK_BYTES = 64 << 10
LARGE_BLOCK_BYTES = 4 << 20
"""Blocks of 4 MiB keep per-block overhead (one message header, one checksum) negligible;
models under 16 MiB (tests) use 64 KiB so they still span several blocks."""


class TensorSlot(NamedTuple):
    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Where each weight lives in the arena, and the block cut."""

    dtype: str
    """torch dtype name without the prefix, e.g. "float32"."""
    element_bytes: int
    slots: tuple[TensorSlot, ...]
    block_bytes: int
    arena_bytes: int
    """A whole number of blocks."""

    @property
    def num_blocks(self) -> int:
        return self.arena_bytes // self.block_bytes

    @classmethod
    def plan(cls, named_shapes: list[tuple[str, tuple[int, ...]]], *, dtype: str,
             element_bytes: int) -> "ArenaLayout":
        slots: list[TensorSlot] = []
        offset = 0
        for name, shape in named_shapes:
            count = 1
            for dim in shape:
                count *= dim
            nbytes = count * element_bytes
            slots.append(TensorSlot(name, tuple(shape), offset, nbytes))
            offset = _round_up(offset + nbytes, ALIGN_BYTES)
        block = LARGE_BLOCK_BYTES if offset >= 16 << 20 else SMALL_BLOCK_BYTES
        return cls(dtype=dtype, element_bytes=element_bytes, slots=tuple(slots), block_bytes=block,
                   arena_bytes=max(block, _round_up(offset, block)))

    def blocks_of(self, slot: TensorSlot) -> range:
        """Indices of the blocks a tensor's bytes touch."""
        first = slot.offset // self.block_bytes
        last = (slot.offset + max(slot.nbytes, 1) - 1) // self.block_bytes
        return range(first, last + 1)


class WeightArena:
    """The arena tensor plus its layout; `views()` gives each weight as a typed tensor."""

    def __init__(self, layout: ArenaLayout, data: Any) -> None:
        self.layout = layout
        self.data = data
        """1-D uint8 torch tensor of layout.arena_bytes."""

    @classmethod
    def allocate(cls, named_shapes: list[tuple[str, tuple[int, ...]]], *, dtype: Any,
                 device: Any) -> "WeightArena":
        import torch

        element_bytes = torch.empty((), dtype=dtype).element_size()
        layout = ArenaLayout.plan(named_shapes, dtype=str(dtype).removeprefix("torch."),
                                  element_bytes=element_bytes)
        # zeros, not empty: padding bytes are part of every block's checksum
        return cls(layout, torch.zeros(layout.arena_bytes, dtype=torch.uint8, device=device))

    def views(self) -> dict[str, Any]:
        import torch

        dtype = getattr(torch, self.layout.dtype)
        return {s.name: self.data[s.offset:s.offset + s.nbytes].view(dtype).view(s.shape)
                for s in self.layout.slots}

    def block_views(self) -> list[object]:
        """One view per block: a memoryview on CPU, a uint8 tensor slice on CUDA (no copy)."""
        size = self.layout.block_bytes
        if self.data.device.type == "cpu":
            flat = memoryview(self.data.numpy())
            return [flat[i * size:(i + 1) * size] for i in range(self.layout.num_blocks)]
        return [self.data[i * size:(i + 1) * size] for i in range(self.layout.num_blocks)]

    def host_bytes(self, offset: int, nbytes: int) -> Any:
        """A host numpy view (CPU) or copy (CUDA) of a byte range, for hashing."""
        piece = self.data[offset:offset + nbytes]
        return piece.numpy() if piece.device.type == "cpu" else piece.cpu().numpy()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
