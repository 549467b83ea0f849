"""Open a GGUF file with ggml's own reader (`gguf` package) and read typed metadata.

The `gguf` package is the reference reader maintained with llama.cpp: it knows
every header version and alignment rule, so dyn never parses the format itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dyn.engine.loader import CheckpointError


class GGUFFile:
    """Metadata and tensors of one GGUF file (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            from gguf import GGUFReader
        except ImportError as exc:
            raise CheckpointError(f"reading GGUF needs the 'gguf' package ({exc}); pip install gguf",
                                  path=self.path) from None
        if not self.path.is_file():
            raise CheckpointError("GGUF file not found", path=self.path)
        try:
            self.reader = GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError) as exc:  # IndexError: a truncated file
            raise CheckpointError(f"not a readable GGUF file: {exc}", path=self.path) from None
        self.architecture: str = self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` as a Python value (str, int, float, bool or list); `default` when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"metadata key {key!r} is missing", path=self.path)
        return value

    def arch(self, key: str, default: Any = None) -> Any:
        """Architecture-scoped metadata: `arch("block_count")` reads `llama.block_count`."""
        return self.get(f"{self.architecture}.{key}", default)

    def require_arch(self, key: str) -> Any:
        return self.require(f"{self.architecture}.{key}")

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]
