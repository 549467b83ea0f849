"""The ModelRunner contract: what the generic Engine asks of a model.

The engine core (scheduler, block manager) decides *what* runs each step and
in which pool blocks the KV lives; the runner does the math (forward pass and
sampling) and owns the KV pool memory. The engine core never imports torch.

KV pool layout (torch runner): one tensor

    pool[num_blocks, 2 (K,V), num_layers, block_size, num_kv_heads, head_dim]

so `pool[b]` is one contiguous region and a block moves with one copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from dyn.engine.backend import PromptLogprobs, SamplingParams


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a step."""

    request_id: str
    token_ids: list[int]
    """Tokens to run through the model this step (a prefill chunk, or 1 decode token)."""
    start_pos: int
    """Absolute position of token_ids[0]."""
    block_ids: list[int]
    """Pool block ids of the whole sequence, covering positions [0, start_pos+len(token_ids))."""
    sample: bool
    """Produce the next token after this work (last prefill chunk, or decode)."""
    sampling: SamplingParams
    num_generated: int
    """Tokens generated so far (for seeded sampling streams)."""
    all_token_ids: list[int] | None = None
    """Prompt + generated (penalties; prompt scores read the next token from it; may be None)."""
    num_prompt_tokens: int = 0
    """Where the prompt ends in all_token_ids (prompt scores stop there)."""
    constraint: Any = None
    """With sample: the request's grammar (dyn.engine.grammar.Constraint), masking what it may sample."""
    num_resumed: int = 0
    """EngineRequest.resumed_tokens: the prompt's tail that is the request's earlier output (a
    migrated request), which seeded streams, penalties and bad words count as output."""


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, int]
    """request_id -> new token, for every SeqWork with sample=True."""
    logprobs: dict[str, float] | None = None
    duration_s: float = 0.0
    """Modelled (mock) or measured (torch) step time."""
    top: dict[str, tuple[list[int], list[float]]] | None = None
    """request_id -> the likeliest tokens and their logprobs (SamplingParams.top_logprobs)."""
    prompt: dict[str, PromptLogprobs] | None = None
    """request_id -> scores of the prompt tokens after this step's rows (SamplingParams.prompt_logprobs):
    row i of the work scores token start_pos + i + 1, for the rows whose next token is in the prompt."""


class ModelRunner(ABC):
    """Runs a model over paged KV blocks; owns the pool memory."""

    block_size: int
    num_blocks: int
    """KV pool size, fixed at construction from a memory budget."""
    block_bytes: int
    kv_on_cuda: bool = False
    """Whether block_view returns CUDA tensors (Backend.kv_on_cuda)."""
    scores_prompts: bool = False
    """Whether execute answers SamplingParams.prompt_logprobs (StepResult.prompt); a runner that
    does not (the mock) leaves a request's prompt scores out, as it leaves out its logprobs."""
    biases_logits: bool = False
    """Whether execute applies SamplingParams' logit_bias, allowed_token_ids and bad words (a
    runner that samples from logits); the engine refuses such requests otherwise (the mock picks
    its tokens from its KV payloads)."""
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context: int

    @abstractmethod
    def execute(self, work: list[SeqWork]) -> StepResult:
        """Run every SeqWork (writing its KV into its blocks) and sample where asked."""

    @abstractmethod
    def block_view(self, block_id: int) -> object:
        """Writable 1-D uint8 view of one block's payload.

        A memoryview for host pools, a uint8 tensor for CUDA pools; no copy.
        """

    def copy_block(self, src_block_id: int, dst_block_id: int) -> None:
        """Copy one block's payload onto another (default: through block_view)."""
        dst = self.block_view(dst_block_id)
        dst[:] = self.block_view(src_block_id)  # type: ignore[index]
