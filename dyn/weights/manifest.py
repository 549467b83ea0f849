"""The weight manifest: what a loaded model's arena holds, byte for byte.

Written once per node and weights key (the first worker that loads the model
there), as `<run_dir>/weights/<key>.json`:

    {"key": "...", "engine": "torch", "dtype": "float32", "tp_size": 1, "tp_rank": 0,
     "block_bytes": 65536, "arena_bytes": 524288,
     "tensors": [{"name": "embed", "shape": [512, 64], "dtype": "float32",
                  "offset": 0, "nbytes": 131072, "xxh3": 1234...}, ...],
     "block_hashes": [xxh3_64 of each arena block]}

A worker that pulls its weights from a peer checks every block against
`block_hashes` as it lands (and refetches a bad one) and every tensor against
its `xxh3` before it serves, so a peer's memory corruption, a transport bug
or a peer with other weights can only cost time, never correctness.

The key names the weights before they are read: checkpoint identity (config,
safetensors headers, sampled pages of every file), engine, dtype and the
tensor-parallel shard. Two workers with one key produce the same arena.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from dyn.errors import DynError
from dyn.engine.weight_arena import ArenaLayout, WeightArena

MANIFEST_VERSION = 1
SAMPLED_PAGES = 64
"""Pages of 4 KiB read from each safetensors file for the key: two fine-tunes of one
architecture share config and headers but differ in every sampled page."""
_PAGE = 4096


class ManifestError(DynError):
    """A manifest is malformed, or does not match the weights it should describe."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    xxh3: int


@dataclass(frozen=True, slots=True)
class WeightManifest:
    key: str
    engine: str
    dtype: str
    tp_size: int
    tp_rank: int
    block_bytes: int
    arena_bytes: int
    tensors: tuple[TensorEntry, ...]
    block_hashes: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    def matches_layout(self, layout: ArenaLayout) -> bool:
        """Same cut and same tensor places as an arena this worker allocated."""
        mine = [(s.name, tuple(s.shape), s.offset, s.nbytes) for s in layout.slots]
        theirs = [(t.name, tuple(t.shape), t.offset, t.nbytes) for t in self.tensors]
        return (self.block_bytes == layout.block_bytes and self.arena_bytes == layout.arena_bytes
                and self.dtype == layout.dtype and mine == theirs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = MANIFEST_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<manifest>") -> "WeightManifest":
        """Validate untrusted data (a peer's reply, a file); ManifestError names what is wrong."""
        try:
            if data.get("version") != MANIFEST_VERSION:
                raise ManifestError(f"{source}: manifest version {data.get('version')!r}, "
                                    f"expected {MANIFEST_VERSION}")
            tensors = tuple(TensorEntry(str(t["name"]), tuple(int(d) for d in t["shape"]), str(t["dtype"]),
                                        int(t["offset"]), int(t["nbytes"]), int(t["xxh3"]))
                            for t in data["tensors"])
            out = cls(key=str(data["key"]), engine=str(data["engine"]), dtype=str(data["dtype"]),
                      tp_size=int(data["tp_size"]), tp_rank=int(data["tp_rank"]),
                      block_bytes=int(data["block_bytes"]), arena_bytes=int(data["arena_bytes"]),
                      tensors=tensors, block_hashes=tuple(int(h) for h in data["block_hashes"]))
        except ManifestError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None
        if out.block_bytes <= 0 or out.arena_bytes != out.block_bytes * out.num_blocks:
            raise ManifestError(f"{source}: {out.num_blocks} blocks of {out.block_bytes} bytes do not make "
                                f"an arena of {out.arena_bytes} bytes")
        for t in out.tensors:
            if t.offset < 0 or t.nbytes < 0 or t.offset + t.nbytes > out.arena_bytes:
                raise ManifestError(f"{source}: tensor {t.name!r} at {t.offset}+{t.nbytes} lies outside the arena")
        return out


def weights_key(model_dir: str | Path, *, engine: str, dtype: str, tp_size: int = 1, tp_rank: int = 0) -> str:
    """A name for the weights a worker will hold, computed from a few KiB of the checkpoint."""
    root = Path(model_dir)
    h = xxhash.xxh3_128()
    h.update(f"{engine}|{dtype}|tp{tp_size}.{tp_rank}|".encode())
    if root.is_file():  # a GGUF file: its header and metadata lead, then sampled pages
        _sample_file(h, root, header_bytes=1 << 20)
        return h.hexdigest()
    config = root / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"-")
    for file in sorted(root.glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        _sample_file(h, file, header_bytes=8 + min(header_len, 64 << 20))
    return h.hexdigest()


def _sample_file(h: Any, file: Path, *, header_bytes: int) -> None:
    size = file.stat().st_size
    h.update(f"|{file.name}:{size}|".encode())
    with open(file, "rb") as f:
        h.update(f.read(header_bytes))
        for i in range(SAMPLED_PAGES):
            f.seek(size * i // SAMPLED_PAGES)
            h.update(f.read(_PAGE))


def build_manifest(arena: WeightArena, *, key: str, engine: str, tp_size: int = 1,
                   tp_rank: int = 0) -> WeightManifest:
    """Hash every tensor and every block of a loaded arena (xxh3: ~10 GB/s on one core)."""
    layout = arena.layout
    tensors = tuple(TensorEntry(s.name, s.shape, layout.dtype, s.offset, s.nbytes,
                                xxhash.xxh3_64_intdigest(arena.host_bytes(s.offset, s.nbytes)))
                    for s in layout.slots)
    return WeightManifest(key=key, engine=engine, dtype=layout.dtype, tp_size=tp_size, tp_rank=tp_rank,
                          block_bytes=layout.block_bytes, arena_bytes=layout.arena_bytes, tensors=tensors,
                          block_hashes=tuple(block_hash(arena, i) for i in range(layout.num_blocks)))


def block_hash(arena: WeightArena, index: int) -> int:
    size = arena.layout.block_bytes
    return xxhash.xxh3_64_intdigest(arena.host_bytes(index * size, size))


def bad_tensors(arena: WeightArena, manifest: WeightManifest) -> list[str]:
    """Names of tensors whose bytes differ from the manifest (empty: all good)."""
    return [t.name for t in manifest.tensors
            if xxhash.xxh3_64_intdigest(arena.host_bytes(t.offset, t.nbytes)) != t.xxh3]


def manifest_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "weights" / f"{key}.json"


def read_manifest(path: str | Path) -> WeightManifest | None:
    """The manifest at `path`, None when there is none; ManifestError when it is corrupt."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read manifest: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{p}: not valid JSON: {exc}") from None
    return WeightManifest.from_dict(data, str(p))


def write_once(manifest: WeightManifest, path: str | Path) -> bool:
    """Write the manifest unless one exists; atomic (temp file + link), so a concurrent
    first load on the same node never leaves a torn file. True when this call wrote it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.to_dict()), encoding="utf-8")
    try:
        os.link(tmp, p)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
