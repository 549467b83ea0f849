"""Request-plane messages: frontend (DEALER) <-> worker (ROUTER).

One GenerateRequest yields a stream of TokenChunk and ends with exactly one
Finish (on its own or carried by the last TokenChunk) or RequestFailed. Cancel may be sent at any time; the worker then
ends the stream with Finish(reason="abort"). A worker sends the chunks one engine step (or
burst of steps) made for one frontend together, in one TokenChunks frame: each chunk is still
one request's tokens of that step, and a receiver takes them in order as separate messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dyn.control.codec import Codec, Message
from dyn.control.kv_events import KvSnapshot, KvSnapshotRequest
from dyn.control.sampling import PromptLogprobs, SamplingParams


ATTEMPT_SEPARATOR = "#"
"""A request sent again to a worker that had it before goes as "<id>#<n>" (a fresh stream there:
dyn.frontend.worker_stream); client ids cannot hold it."""


@dataclass(slots=True)
class GenerateRequest(Message):
    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Travels as a map of its fields; the codec checks each one's type."""
    priority: int = 0
    salt: int = 0
    prefill_only: bool = False
    """Disaggregated prefill: stop after the first token, offer the KV for pickup."""
    kv_source: dict[str, Any] | None = None
    """Disaggregated decode: where to pull the prompt's KV from (a shuttle offer)."""
    first_token: int | None = None
    """With kv_source: the token the prefill worker sampled."""
    retention_priority: int = 0
    retention_ttl_s: float | None = None
    retention_blocks: int | None = None
    """Agent hint `retention`: keep the leading N blocks (None: all) at this priority / TTL;
    retention_priority 0 with no TTL: the default retention."""
    session_id: str | None = None
    """Agent session: the worker remembers which blocks it retained, for CloseSession."""
    speculative: bool = False
    """A speculative next-turn prefill: refused when the worker has a queue (cancelled under
    pressure), runs at low priority."""
    resumed_tokens: int = 0
    """The prompt's last this-many tokens are this request's own output from an earlier attempt
    (a migration): a json_schema grammar continues after them instead of starting over."""
    adapter: str | None = None
    """The LoRA adapter to run with (a name of recipe model.lora_adapters; the worker knows its
    directory); None: the base model. Its KV blocks are apart: the salt includes the adapter."""
    hold_s: float = 0.0
    """The client reads only the whole answer (non-streaming, no stop strings): after the first
    token the worker may keep this request's tokens back for up to hold_s and send them together,
    one message per request instead of one per engine step. The first token still goes at once
    (TTFT, and the router's view of which prompts are still queued for prefill), and a long
    answer still arrives every hold_s, well inside the frontend's stall deadline."""


@dataclass(slots=True)
class Finish(Message):
    TYPE: ClassVar[str] = "finish"
    request_id: str
    reason: str
    """stop | length | abort"""
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    kv_offer: dict[str, Any] | None = None
    """prefill_only requests: the shuttle offer the decode worker pulls from."""


@dataclass(slots=True)
class TokenChunk(Message):
    TYPE: ClassVar[str] = "token_chunk"
    request_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    num_cached_tokens: int = 0
    finish: Finish | None = None
    """The stream's Finish, when it ends with these tokens: the receiver takes the chunk and
    then this Finish, as if they came as two messages (one message less per request; a short
    request on a fast engine is often one chunk)."""
    top_ids: list[list[int]] | None = None
    """top_logprobs: per token, the likeliest tokens (most likely first) ..."""
    top_logprobs: list[list[float]] | None = None
    """... and their logprobs."""
    prompt_logprobs: PromptLogprobs | None = None
    """SamplingParams.prompt_logprobs: the prompt's scores, on the stream's first chunk."""


@dataclass(slots=True)
class TokenChunks(Message):
    """Several requests' TokenChunks in one frame (one per request per engine step, in order):
    with a token per step, a batch of 32 decoding requests costs one frame, one send, one
    CURVE box and one receive per step instead of 32."""

    TYPE: ClassVar[str] = "token_chunks"
    chunks: list[TokenChunk]


def unbatched(message: Message) -> list[Message]:
    """The messages a received one stands for: a TokenChunks' chunks, else the message itself."""
    return list(message.chunks) if type(message) is TokenChunks else [message]


@dataclass(slots=True)
class RequestFailed(Message):
    TYPE: ClassVar[str] = "request_failed"
    request_id: str
    code: str
    """bad_request | overloaded | internal | kv_transfer"""
    message: str
    retryable: bool = False


@dataclass(slots=True)
class CloseSession(Message):
    """An agent session ended: the worker gives its retained blocks the default retention."""

    TYPE: ClassVar[str] = "close_session"
    session_id: str


@dataclass(slots=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    request_id: str


# KV snapshots ride the request plane: the subscriber already holds a connection to each worker.
REQUEST_CODEC = Codec([GenerateRequest, TokenChunk, TokenChunks, Finish, RequestFailed, Cancel,
                       KvSnapshotRequest, KvSnapshot, CloseSession])
