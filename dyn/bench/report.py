"""Per-request measurements and the JSON report built from them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dyn.bench.stats import summarize

if TYPE_CHECKING:
    from dyn.bench.runner import BenchConfig
    from dyn.bench.synth import PromptSynthesizer


@dataclass(slots=True)
class RequestResult:
    idx: int
    """Position in the trace."""
    ok: bool
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int | None = None
    """From the final usage chunk, else the number of content chunks."""
    num_chunks: int = 0
    start_s: float = 0.0
    """Send time, seconds after the run started."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    """Gaps between content chunks."""
    migrated: bool = False
    refused: bool = False
    """Answered 429 (admission control said: come back later) and not retried, or out of retries."""
    retries: int = 0
    """429 answers retried after their Retry-After before this result."""

    @property
    def mean_itl_s(self) -> float | None:
        """(e2e - ttft) / (tokens - 1): robust when a chunk carries several tokens."""
        tokens = self.output_tokens or 0
        if self.ttft_s is None or self.e2e_s is None or tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (tokens - 1)


@dataclass(frozen=True)
class BenchReport:
    data: dict[str, Any]
    results: tuple[RequestResult, ...]

    def to_json(self) -> dict[str, Any]:
        return self.data


def build_report(results: list[RequestResult], config: "BenchConfig", duration_s: float,
                 counters: dict[str, float], synth: "PromptSynthesizer", not_sent: int) -> BenchReport:
    ok = [r for r in results if r.ok]
    duration_s = max(duration_s, 1e-9)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    itl: list[float] = []
    for r in ok:
        # Chunk gaps are token gaps only when each chunk carries one token.
        if r.output_tokens == r.num_chunks:
            itl.extend(r.itl_s)
        elif r.mean_itl_s is not None:
            itl.extend([r.mean_itl_s] * (r.output_tokens - 1))  # type: ignore[operator]
    good = [r for r in ok if _meets_slos(r, config)]
    hits, lookups = counters.get(config.hit_metric), counters.get(config.lookup_metric)
    hit_rate = None if hits is None or not lookups else min(max(hits / lookups, 0.0), 1.0)
    migrated = max(sum(r.migrated for r in results), int(counters.get(config.migrated_metric, 0)))
    data: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": sum(not r.ok and not r.refused for r in results),
        "refused": sum(r.refused for r in results),
        "retried_429": sum(r.retries for r in results),
        "not_sent": not_sent,
        "migrated": migrated,
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "input_tokens_per_s": sum(r.prompt_tokens for r in ok) / duration_s,
        "ttft_ms": summarize([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        "itl_ms": summarize([x * 1e3 for x in itl]),
        "tpot_ms": summarize([r.mean_itl_s * 1e3 for r in ok if r.mean_itl_s is not None]),
        "e2e_ms": summarize([r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]),
        "goodput_rps": len(good) / duration_s,
        "slo": {"ttft_ms": config.slo_ttft_ms, "itl_ms": config.slo_itl_ms,
                "e2e_ms": config.slo_e2e_ms, "met": len(good)},
        "prefix_hit_rate": hit_rate,
        "prefix_hit_blocks": hits,
        "prefix_lookup_blocks": lookups,
        "errors": dict(Counter(r.error for r in results if r.error).most_common(5)),
        "settings": {"block_tokens": synth.block_tokens, "length_scale": synth.length_scale,
                     "speedup": config.speedup, "concurrency": config.concurrency,
                     "output_scale": config.output_scale, "max_requests": config.max_requests,
                     "max_retries_429": config.max_retries_429},
    }
    return BenchReport(data, tuple(sorted(results, key=lambda r: r.idx)))


def _meets_slos(r: RequestResult, config: "BenchConfig") -> bool:
    if config.slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > config.slo_ttft_ms):
        return False
    if config.slo_itl_ms is not None and r.mean_itl_s is not None \
            and r.mean_itl_s * 1e3 > config.slo_itl_ms:
        return False
    if config.slo_e2e_ms is not None and (r.e2e_s is None or r.e2e_s * 1e3 > config.slo_e2e_ms):
        return False
    return True
