"""A request as the engine core sees it: tokens, progress and its blocks.

    all_token_ids:  [ prompt ............ | generated ... ]
                    [0 ........ num_computed)  not yet run through the model
    block_ids:      one pool block per block_size tokens of [0, num_computed + chunk)
    block_hashes:   chained hashes of every FULL block of all_token_ids

One rule covers prefill, chunked prefill, decode, recompute after preemption
and the tail of an imported prompt: each step runs some of
`all_token_ids[num_computed:]`; when a chunk reaches the end, the runner
samples the next token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from dyn.engine.backend import EngineRequest, FinishReason, PromptLogprobs, SamplingParams
from dyn.kv.hashing import BlockHashCache, hash_blocks


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    IMPORTING = "importing"
    """Blocks reserved, payloads arriving from another engine (begin_import)."""
    EXPORTED = "exported"
    """A finished prefill_only request whose blocks stay pinned for export_kv."""
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request: EngineRequest
    arrival_idx: int
    """Admission order; earlier runs first within one priority."""
    all_token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed: int = 0
    """Tokens whose KV is in block_ids (computed, cached, fetched or imported)."""
    num_registered_blocks: int = 0
    """Leading full blocks already in (or looked up against) the prefix cache."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0
    """Prompt tokens served from the cache on first admission (reported once)."""
    is_first_output: bool = True
    constraint: Any = None
    """SamplingParams.structured: the request's grammar state (dyn.engine.grammar.Constraint)."""
    prompt_scores: PromptLogprobs | None = None
    """SamplingParams.prompt_logprobs: the scores so far, sent with the first output."""
    finish_reason: FinishReason | None = None
    exported_at_s: float = 0.0
    order: tuple[int, int] = (0, 0)
    """Scheduling order: (-priority, arrival_idx), set once (see sort_key)."""

    def __post_init__(self) -> None:
        self.order = (-self.request.priority, self.arrival_idx)

    @classmethod
    def from_request(cls, request: EngineRequest, arrival_idx: int, block_size: int,
                     hashes: BlockHashCache | None = None) -> "Sequence":
        """`hashes`: a cache for the prompt's block hashes (prompts share prefixes)."""
        seq = cls(request=request, arrival_idx=arrival_idx,
                  all_token_ids=list(request.prompt_token_ids),
                  num_prompt_tokens=len(request.prompt_token_ids))
        if hashes is None:
            seq.extend_hashes(block_size)
        else:
            seq.block_hashes = hashes.hash_blocks(seq.all_token_ids, block_size, request.salt)
        return seq

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.all_token_ids) - self.num_computed

    @property
    def needs_prompt_scores(self) -> bool:
        """The prompt must run through the model whole: its scores are asked for and not yet sent."""
        return self.is_first_output and self.request.sampling.prompt_logprobs is not None

    @property
    def num_retained_blocks(self) -> int:
        """Leading full blocks that carry the request's retention (0: none asked)."""
        req = self.request
        if req.retention is None:
            return 0
        num = len(self.block_hashes)
        return num if req.retention_blocks is None else min(num, req.retention_blocks)

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: higher priority first, then earlier arrival."""
        return self.order

    def append_token(self, token_id: int, block_size: int) -> None:
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % block_size == 0:
            self.extend_hashes(block_size)

    def extend_hashes(self, block_size: int) -> None:
        """Hash every newly full block (incremental: one hash per new block)."""
        start = len(self.block_hashes) * block_size
        if len(self.all_token_ids) - start >= block_size:  # (one packing pass for a whole prompt)
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes += hash_blocks(self.all_token_ids[start:], block_size, self.request.salt, parent)

    def reset_for_recompute(self) -> None:
        """Preempted: drop all KV progress; the tokens themselves are kept."""
        self.num_computed = 0
        self.num_registered_blocks = 0
        self.block_ids = []
        self.status = SequenceStatus.WAITING
