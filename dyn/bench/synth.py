"""Turn trace records into real prompts whose sharing matches the trace.

Each hash id becomes a fixed run of `block_tokens` token ids drawn from a
generator seeded by (seed, hash id), so two requests that share leading hash
ids share a real token prefix, and a rerun sends the same tokens. Requests
without hash ids (Azure) get tokens seeded by their position in the trace:
unique, but still reproducible.

`block_tokens` may be smaller than the trace's block size: lengths shrink by
the same ratio, keeping the sharing pattern while making prompts short
enough for a CPU deployment.
"""

from __future__ import annotations

import numpy as np

from dyn.bench.trace import TraceRequest
from dyn.errors import DynError

_BLOCK_DOMAIN, _REQUEST_DOMAIN = 0, 1


class SynthError(DynError):
    """Bad synthesis settings (`field` names the option)."""

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class PromptSynthesizer:
    """Deterministic prompt token ids for trace requests."""

    def __init__(self, trace_block_tokens: int, block_tokens: int | None = None, *,
                 vocab_size: int = 32000, min_token_id: int = 100, seed: int = 0,
                 length_scale: float | None = None, max_cached_blocks: int = 65536) -> None:
        block_tokens = block_tokens or trace_block_tokens or 512
        if block_tokens <= 0:
            raise SynthError(f"must be > 0, got {block_tokens}", field="block_tokens")
        if not 0 <= min_token_id < vocab_size:
            raise SynthError(f"must be within 0..vocab_size-1 ({vocab_size - 1}), got {min_token_id}",
                             field="min_token_id")
        self.block_tokens = block_tokens
        self.trace_block_tokens = trace_block_tokens
        if length_scale is None:
            length_scale = block_tokens / trace_block_tokens if trace_block_tokens else 1.0
        if length_scale <= 0:
            raise SynthError(f"must be > 0, got {length_scale}", field="length_scale")
        self.length_scale = length_scale
        self.vocab_size = vocab_size
        self.min_token_id = min_token_id
        self.seed = seed
        self._blocks: dict[int, list[int]] = {}
        self._max_cached_blocks = max_cached_blocks

    def prompt_length(self, request: TraceRequest) -> int:
        """Tokens sent for the request: its input length scaled, at least 1."""
        length = max(1, round(request.input_length * self.length_scale))
        if request.hash_ids:
            length = min(length, len(request.hash_ids) * self.block_tokens)
        return length

    def prompt_tokens(self, request: TraceRequest, request_idx: int) -> list[int]:
        length = self.prompt_length(request)
        if not request.hash_ids:
            return self._draw((self.seed, _REQUEST_DOMAIN, request_idx), length)
        tokens: list[int] = []
        for hash_id in request.hash_ids:
            if len(tokens) >= length:
                break
            tokens.extend(self.block(hash_id))
        del tokens[length:]
        return tokens

    def block(self, hash_id: int) -> list[int]:
        """The token run of one hash id (cached; every Mooncake prompt starts with id 0)."""
        tokens = self._blocks.get(hash_id)
        if tokens is None:
            tokens = self._draw((self.seed, _BLOCK_DOMAIN, hash_id), self.block_tokens)
            if len(self._blocks) >= self._max_cached_blocks:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[hash_id] = tokens
        return tokens

    def _draw(self, key: tuple[int, int, int], count: int) -> list[int]:
        rng = np.random.default_rng(list(key))
        return rng.integers(self.min_token_id, self.vocab_size, size=count).tolist()
