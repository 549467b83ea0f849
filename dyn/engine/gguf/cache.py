"""One converted copy of each GGUF file, reused across launches.

    $DYN_MODEL_CACHE (default ~/.cache/dyn/models)/
      gguf/<stem>-<hash of the file's path>.<dtype>/   the HF directory (see convert.py)
        dyn-gguf-source.json                           what it was made from: path, size, mtime_ns
      gguf/<...>.lock                                  held while converting

A copy whose stamp disagrees with the file (replaced, touched, resized) is
rebuilt. Workers of one node start together, so conversion holds a file lock
and writes into a temporary directory renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from dyn.engine.gguf.convert import convert_gguf

STAMP = "dyn-gguf-source.json"
CACHE_ENV = "DYN_MODEL_CACHE"
FORMAT_VERSION = 1
"""Bump when convert.py writes different files, so old copies are rebuilt."""


def default_cache_root() -> Path:
    """`$DYN_MODEL_CACHE`, else ~/.cache/dyn/models (where the tiny test model lives too)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dyn" / "models")


def cached_conversion(gguf_path: str | Path, *, dtype: str, cache_root: str | Path | None = None) -> Path:
    """The HF directory converted from `gguf_path` at `dtype`: from the cache, or converted now."""
    source = Path(gguf_path).resolve()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = hashlib.sha256(str(source).encode()).hexdigest()[:10]
    target = root / "gguf" / f"{source.stem}-{key}.{dtype}"
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(source, dtype)
    if _stamp_of(target) == stamp:
        return target
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if we crash
        if _stamp_of(target) == stamp:  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a converter that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            convert_gguf(source, tmp, dtype=dtype)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stamp(source: Path, dtype: str) -> dict:
    st = source.stat()
    return {"source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype,
            "format": FORMAT_VERSION}


def _stamp_of(target: Path) -> dict | None:
    try:
        return json.loads((target / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
