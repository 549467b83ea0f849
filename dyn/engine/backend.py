"""The backend interface every engine implements (torch, mock, trtllm).

Workers call it from one synchronous step loop: `add_request`, then `step()`
repeatedly while `has_work()`. Nothing here is async or thread-safe.

Disaggregation contract (block hashes from dyn.kv.hashing name KV content):

    prefill engine                              decode engine
    --------------                              -------------
    add_request(req with prefill_only=True)
    step() ... -> TokenOutput(finished, first token)
    export_kv(rid) -> KvExport                  begin_import(req, export.block_hashes)
      .block_hashes, .block_views  ==shuttle==>   -> KvImport.missing_idx, dest views
                                                 (shuttle writes payloads into dest views)
    release_export(rid)                         commit_import(rid, first_token)
                                                step() ... continues decoding

A block view is a writable 1-D uint8 view over one pool block, with no copy:
a `memoryview` for host memory (torch CPU pool, the mock's bytearray pool), a
uint8 torch tensor for CUDA pools. K and V of every layer of a block sit in one
contiguous region, so a block moves with one copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from dyn.control.sampling import PromptLogprobs, SamplingParams
from dyn.kv.events import KvEventListener, LowerTier
from dyn.kv.retention import Retention

FinishReason = Literal["stop", "length", "abort", "error"]
IMPORTED_PROMPT_SCORES = ("prompt_logprobs needs the whole prompt run through this worker's model; a "
                          "request whose prompt KV comes from a prefill worker has no logits for it")


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    """Higher runs first; preempted last."""
    salt: int = 0
    """Tenant (and adapter) salt of the block hashes."""
    prefill_only: bool = False
    """Stop after the first token and keep the KV blocks for export_kv."""
    retention: Retention | None = None
    """Keep this request's blocks at this priority / for this TTL (agent hint); None: default."""
    retention_blocks: int | None = None
    """Only the leading N full blocks are retained (marked system prompt, tool schemas);
    None: every full block, prompt and answer."""
    session_id: str | None = None
    """The agent session: release_session(session_id) gives its blocks back default retention."""
    resumed_tokens: int = 0
    """GenerateRequest.resumed_tokens: the prompt's tail that is this request's earlier output."""
    adapter: str | None = None
    """GenerateRequest.adapter: the LoRA adapter (recipe model.lora_adapters) the answer runs with."""


@dataclass(slots=True)
class TokenOutput:
    """New tokens of one request from one step."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[float] | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (set on the first output)."""
    top_ids: list[list[int]] | None = None
    """SamplingParams.top_logprobs: per token, the likeliest tokens (most likely first)..."""
    top_logprobs: list[list[float]] | None = None
    """... and their logprobs (parallel to top_ids)."""
    prompt_logprobs: PromptLogprobs | None = None
    """SamplingParams.prompt_logprobs: the prompt's scores (on the request's first output)."""


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_total: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_free: int = 0
    prefix_hit_blocks: int = 0
    """Cumulative: prompt blocks found in the cache."""
    prefix_lookup_blocks: int = 0
    """Cumulative: prompt blocks looked up."""
    num_computed_tokens: int = 0
    """Cumulative: tokens run through the model (prefill + decode)."""
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_waiting_prefill_tokens: int = 0
    """Prompt tokens not yet computed, over waiting and running requests."""
    num_tier_hit_blocks: int = 0
    """Cumulative: prefix blocks brought back from a lower tier instead of recomputed."""


@dataclass(slots=True)
class KvExport:
    request_id: str
    block_hashes: list[int]
    """Hashes of the request's full prompt blocks, in order."""
    block_views: list[object]
    """One block view per block (see module doc); valid until release_export."""
    first_token: int
    num_prompt_tokens: int


class KvImport(NamedTuple):
    missing_idx: list[int]
    """Indices into the offered hashes whose payload must be written."""
    dest_views: list[object]
    """Writable block views, one per missing index."""


class Backend(ABC):
    """An inference engine driven by a synchronous step loop."""

    block_size: int
    block_bytes: int
    """Bytes of one KV block payload (all layers, K and V)."""
    steps_in_interpreter: bool = False
    """True when a step is Python only and holds the GIL throughout (the mock): a worker then steps
    it on its event loop's thread (dyn.worker.inline_loop), since a thread of its own would only
    add hand-offs; engines whose steps run outside the interpreter (torch ops, vLLM) keep one."""
    kv_on_cuda: bool = False
    """Whether the block views are CUDA memory (what cuda_ipc moves); False: host memory. The KV
    hand-off picks its transports by this, not by the GPUs a placement names (a mock worker
    placed on GPUs still holds host memory)."""

    @abstractmethod
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises RequestError for bad input; other requests are unaffected."""

    def preparation(self, request: EngineRequest) -> Callable[[], None] | None:
        """What `request` needs done before add_request (or begin_import) that is too slow for the
        engine's thread, where it would stall every running request: a call for a worker thread
        to make first (it may raise RequestError), or None when there is nothing to do."""
        return None

    @abstractmethod
    def step(self) -> list[TokenOutput]:
        """Run one scheduling step; return the new tokens of every request that made progress."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a request (unknown ids are ignored); its blocks return to the pool."""

    @abstractmethod
    def has_work(self) -> bool:
        """True while any request is waiting or running."""

    def is_waiting_on_transfers(self) -> bool:
        """True when the last step computed nothing because every unfinished request waits on a KV
        transfer from elsewhere; stepping again only polls it, so the caller may pause briefly."""
        return False

    @abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of counters and gauges."""

    def num_waiting(self) -> int:
        """Requests queued and not yet running (admission asks this for every request)."""
        return self.stats().num_waiting

    @abstractmethod
    def export_kv(self, request_id: str) -> KvExport:
        """KV of a finished prefill_only request; its blocks stay pinned until release_export."""

    @abstractmethod
    def release_export(self, request_id: str) -> None:
        """Unpin an exported request's blocks (they stay in the prefix cache)."""

    def release_stale_exports(self, max_age_s: float) -> list[str]:
        """Release exports nobody picked up within max_age_s; returns their request ids."""
        return []

    @abstractmethod
    def begin_import(self, request: EngineRequest, block_hashes: list[int]) -> KvImport:
        """Reserve blocks for a request whose prompt KV arrives from elsewhere.

        Blocks already cached locally are reused and not asked for. Raises
        RequestError when the pool cannot hold the request right now.
        """

    @abstractmethod
    def commit_import(self, request_id: str, first_token: int) -> None:
        """Payloads are written: the request continues decoding after first_token."""

    @abstractmethod
    def cancel_import(self, request_id: str) -> None:
        """The transfer failed: free the reserved blocks (the caller may prefill locally)."""

    def expire(self) -> int:
        """Drop blocks whose retention expired, in every tier (publishing removal events)."""
        return 0

    def release_session(self, session_id: str) -> None:
        """The session closed: its blocks fall back to the default retention."""

    def set_kv_event_listener(self, listener: KvEventListener | None) -> None:
        """Receive KvEvents as blocks are stored in or removed from the pool."""
        self._kv_event_listener = listener

    def set_lower_tier(self, tier: LowerTier | None) -> None:
        """Offload evicted blocks to `tier` and bring prefix hits back from it."""
        self._lower_tier = tier

