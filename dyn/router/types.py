"""What the router is asked and what it answers: plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

from dyn.router.errors import RouteInputError

WorkerRole = Literal["prefill", "decode", "both"]


@dataclass(frozen=True, slots=True)
class RouteHints:
    """The request's `dyn` extension object, as far as routing cares."""

    priority: int = 0
    """Higher is more urgent; > 0 favours idle workers like latency_sensitive."""
    latency_sensitive: bool = False
    """Prefer a worker with nothing queued over a better cache hit behind a queue."""
    expected_output_tokens: int | None = None
    """Counts toward decode load; long outputs avoid decode-heavy workers."""
    session_id: str | None = None
    """Keep a conversation on its last worker while that is not much worse."""
    session_ttl_s: float | None = None
    """How long the session's affinity lasts after its last request (None: the router's)."""

    def __post_init__(self) -> None:
        if self.expected_output_tokens is not None and self.expected_output_tokens < 0:
            raise RouteInputError(f"must be >= 0, got {self.expected_output_tokens}",
                                  field="dyn.expected_output_tokens")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    block_hashes: Sequence[int]
    """Chained hashes of the prompt's full blocks, in order."""
    num_tokens: int
    """Prompt length in tokens (the last partial block is not hashed)."""
    hints: RouteHints = field(default_factory=RouteHints)

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise RouteInputError(f"must be >= 0, got {self.num_tokens}", field="num_tokens")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker's latest load report (from heartbeats or the simulator)."""

    worker_id: str
    role: WorkerRole = "both"
    waiting_prefill_tokens: int = 0
    """Prompt tokens queued or mid-prefill, not yet computed."""
    active_decode_blocks: int = 0
    """KV blocks of the requests now decoding."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of the KV pool in use, 0..1."""
    max_queue: int = 256
    """num_waiting at which the worker takes no more requests."""
    healthy: bool = True
    num_kv_blocks: int = 0
    """Pool size in blocks (0: unknown; disables the memory-pressure term)."""
    nvlink_domain: str | None = None
    """The worker's NVLink domain (None: unknown): a disaggregated pair prefers to share one."""

    def __post_init__(self) -> None:
        for name in ("waiting_prefill_tokens", "active_decode_blocks", "num_running",
                     "num_waiting", "max_queue", "num_kv_blocks"):
            value = getattr(self, name)
            if value < 0:
                raise RouteInputError(f"must be >= 0, got {value} (worker {self.worker_id!r})",
                                      field=name)
        if not 0.0 <= self.kv_usage <= 1.0:
            raise RouteInputError(f"must be within 0..1, got {self.kv_usage} "
                                  f"(worker {self.worker_id!r})", field="kv_usage")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    worker_id: str
    overlap_blocks: int
    """Leading prompt blocks the chosen worker holds (any tier)."""
    tier_hits: tuple[int, int, int]
    """(device, host, disk) blocks of that cached prefix."""
    scores: dict[str, float]
    """Per candidate: the policy's cost (lower wins) or score (higher wins)."""
    policy: str
    reason: str = ""
    """Why this worker, in a few words (e.g. "lowest cost", "session affinity")."""


@dataclass(frozen=True, slots=True)
class DisaggDecision:
    """Where to prefill (None: on the decode worker itself) and where to decode."""

    decode: RouteDecision
    prefill: RouteDecision | None


class RouteChoice(NamedTuple):
    """A routing answer in either mode: where to prefill and where to decode."""

    prefill: str | None
    """Prefill worker id; None: the decode worker prefills itself."""
    decode: str
    overlap_blocks: int
    """Prompt blocks the decode worker is believed to hold."""
