"""A synthetic day of chat traffic, written as a Mooncake trace (`dyn trace synth`).

Shape: sessions start at a diurnal rate with bursts; each session is a
multi-turn conversation whose turn k+1 resends turn k's prompt and answer
plus a new user message, so its leading hash ids repeat (prefix reuse, as
the live router sees it). A few first turns open with a shared document
(hot, Zipf-popular), and every prompt opens with the one shared system block.

Lengths, turns, think times and sharing are calibrated on the shipped
Mooncake conversation trace (12,031 requests over 3,537 s; measured with
the session rule below, see `_CALIBRATION`). The diurnal curve and the
bursts are not in that one-hour trace: they are stated assumptions.

Session rule used to measure the trace: a request continues the earlier
request whose full hash-id list (or that list minus its last, partial
block) is the longest proper prefix of its own ids.

Memory: requests are emitted in time order from a heap of pending turns,
so it holds only the sessions in flight (start rate x session life), not
the day: 1M requests stream to disk in constant memory.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from dyn.bench.trace import MOONCAKE_BLOCK_TOKENS
from dyn.errors import DynError

DAY_S = 86_400.0

# ---- calibration on /work/shared/traces/mooncake/conversation_trace.jsonl ----------------------
# Quantile tables (probability, value) measured on that trace; sampling interpolates the
# inverse CDF between them (log-linearly for the heavy-tailed ones).
_Q = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
_CALIBRATION = {
    # input_length of a session's first turn (8,056 first turns)
    "first_input_tokens": (891, 894, 898, 907, 1459, 5933, 14281, 26284, 38151, 87172, 126195),
    # input_{k+1} - input_k - output_k of follow-ups (3,975), floored at 1 token: the new user message
    "user_tokens": (1, 1, 1, 1, 9, 26, 369, 4245, 6964, 16705, 91467),
    # output_length of all requests
    "output_tokens": (1, 3, 10, 24, 157, 350, 472, 597, 698, 1120, 2000),
    # seconds between a turn and the session's next one
    "think_s": (6.0, 15.0, 33.0, 48.0, 75.0, 147.0, 315.0, 537.0, 693.0, 1575.0, 3114.0),
}
# Sessions by number of turns (8,056 sessions, mean 1.49 turns/session): the share that
# continues after turn k, P(turns > k) / P(turns >= k), for k = 1..8; later turns use the last.
_CONTINUE_AFTER = (0.2498, 0.3912, 0.5032, 0.5758, 0.5965, 0.6471, 0.7386, 0.7385)
_MEAN_TURNS = 1.4934
SHARED_DOC_SHARE = 0.0848
"""First turns that share more than the system block with an earlier request (683 of 8,056)."""
DOC_OPEN_SHARE = 0.094
"""First turns that open with a shared document: with DOCS_PER_OPENING, ~90% of openings
repeat a document already seen, which gives SHARED_DOC_SHARE."""
DOCS_PER_OPENING = 0.1
SHARED_DOC_MEAN_BLOCKS = 10.7
"""Blocks they share, mean (512-token blocks)."""
SYSTEM_BLOCKS = 1
"""Every request in the trace opens with hash id 0: one shared 512-token block."""
MAX_OUTPUT_TOKENS = 2000
# ---- assumptions (not in a one-hour trace) -----------------------------------------------------
DIURNAL_PEAK_TO_TROUGH = 3.0
"""Busiest hour vs quietest: a typical consumer chat day (assumed)."""
DIURNAL_PEAK_HOUR = 14.0
BURSTS_PER_DAY = 24.0
BURST_RATE_X = 2.5
"""Session starts run this many times faster during a burst (assumed)."""
BURST_MEAN_S = 120.0
DOC_ZIPF_S = 1.1


class SynthError(DynError):
    """Bad arguments to the day synthesizer."""

    exit_code = 2


@dataclass(frozen=True)
class DaySpec:
    num_requests: int
    seed: int = 0
    duration_s: float = DAY_S
    """The day's length: arrivals are spread over it (compress with a shorter one)."""


def write_day(spec: DaySpec, out: str | Path | IO[str]) -> int:
    """Write the trace (Mooncake JSONL, timestamps in ms); returns the records written."""
    if isinstance(out, (str, Path)):
        with open(out, "w", encoding="utf-8") as fh:
            return write_day(spec, fh)
    count = 0
    lines: list[str] = []
    for record in synth_day(spec):
        lines.append(json.dumps(record, separators=(", ", ": ")))
        count += 1
        if len(lines) >= 4096:
            out.write("\n".join(lines) + "\n")
            lines = []
    if lines:
        out.write("\n".join(lines) + "\n")
    return count


def synth_day(spec: DaySpec) -> Iterator[dict]:
    """Records in arrival order: {timestamp (ms), input_length, output_length, hash_ids}."""
    if spec.num_requests < 1:
        raise SynthError(f"--requests must be >= 1, got {spec.num_requests}")
    if not spec.duration_s > 0:
        raise SynthError(f"duration must be > 0 s, got {spec.duration_s}")
    rng = random.Random(spec.seed)
    num_docs = max(1, round(spec.num_requests / _MEAN_TURNS * DOC_OPEN_SHARE * DOCS_PER_OPENING))
    ids = _IdAllocator(rng, num_docs)
    starts = _session_starts(rng, spec.num_requests / (spec.duration_s * _MEAN_TURNS), spec.duration_s)
    pending: list[tuple[float, int, _Session]] = []
    next_start = next(starts)
    serial = 0
    for _ in range(spec.num_requests):
        if not pending or next_start <= pending[0][0]:
            when, session = next_start, _Session(ids.first_turn(rng), rng)
            next_start = next(starts)
        else:
            when, _, session = heapq.heappop(pending)
            session.next_turn(rng, ids)
        record = {"timestamp": int(when * 1000), "input_length": session.input_tokens,
                  "output_length": session.output_tokens, "hash_ids": session.hash_ids}
        session.turns += 1
        if rng.random() < _CONTINUE_AFTER[min(session.turns, len(_CONTINUE_AFTER)) - 1]:
            serial += 1
            heapq.heappush(pending, (when + _draw(rng, "think_s"), serial, session))
        yield record


# ---- sessions ----------------------------------------------------------------------------------

class _Session:
    __slots__ = ("hash_ids", "input_tokens", "output_tokens", "turns")

    def __init__(self, first: tuple[list[int], int], rng: random.Random) -> None:
        self.hash_ids, self.input_tokens = first
        self.output_tokens = _output(rng)
        self.turns = 0

    def next_turn(self, rng: random.Random, ids: "_IdAllocator") -> None:
        """Resend the prompt and the answer, plus a new message: the full blocks are reused."""
        tokens = self.input_tokens + self.output_tokens + round(_draw(rng, "user_tokens"))
        keep = min(self.input_tokens // MOONCAKE_BLOCK_TOKENS, len(self.hash_ids))
        need = -(-tokens // MOONCAKE_BLOCK_TOKENS)
        self.hash_ids = self.hash_ids[:keep] + ids.fresh(need - keep)
        self.input_tokens = tokens
        self.output_tokens = _output(rng)


class _IdAllocator:
    """Hash ids: 0 is the system block, shared documents take a fixed range, then fresh ones.

    An id always follows the same parent (as in Mooncake), so equal ids mean equal prefixes.
    """

    def __init__(self, rng: random.Random, num_docs: int) -> None:
        self._docs: list[list[int]] = []
        nxt = SYSTEM_BLOCKS
        for _ in range(num_docs):
            size = max(1, round(rng.expovariate(1 / SHARED_DOC_MEAN_BLOCKS)))
            self._docs.append(list(range(nxt, nxt + size)))
            nxt += size
        self._next = nxt
        weights = [1 / (rank + 1) ** DOC_ZIPF_S for rank in range(num_docs)]
        total = sum(weights)
        self._doc_cdf = list(_accumulate(w / total for w in weights))

    def fresh(self, count: int) -> list[int]:
        start = self._next
        self._next += max(count, 0)
        return list(range(start, self._next))

    def first_turn(self, rng: random.Random) -> tuple[list[int], int]:
        tokens = round(_draw(rng, "first_input_tokens"))
        need = -(-tokens // MOONCAKE_BLOCK_TOKENS)
        head = list(range(SYSTEM_BLOCKS))
        if rng.random() < DOC_OPEN_SHARE:
            doc = self._docs[min(bisect.bisect_left(self._doc_cdf, rng.random()), len(self._docs) - 1)]
            head += doc
            tokens = max(tokens, (len(head) + 1) * MOONCAKE_BLOCK_TOKENS)
            need = -(-tokens // MOONCAKE_BLOCK_TOKENS)
        return head[:need] + self.fresh(need - min(len(head), need)), tokens


def _session_starts(rng: random.Random, mean_rate: float, duration_s: float) -> Iterator[float]:
    """Start times: a Poisson process thinned to the diurnal curve and the bursts (endless;
    the day repeats past `duration_s`)."""
    amp = (DIURNAL_PEAK_TO_TROUGH - 1) / (DIURNAL_PEAK_TO_TROUGH + 1)
    bursts = _bursts(rng, duration_s)
    burst_starts = [s for s, _ in bursts]
    burst_share = sum(e - s for s, e in bursts) / duration_s
    # Scale so the mean over the day, bursts included, is mean_rate.
    base = mean_rate / (1 + burst_share * (BURST_RATE_X - 1))
    peak = base * (1 + amp) * BURST_RATE_X
    phase = DIURNAL_PEAK_HOUR / 24 * duration_s
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        day_t = t % duration_s
        rate = base * (1 + amp * math.cos(2 * math.pi * (day_t - phase) / duration_s))
        i = bisect.bisect_right(burst_starts, day_t) - 1
        if i >= 0 and day_t < bursts[i][1]:
            rate *= BURST_RATE_X
        if rng.random() * peak < rate:
            yield t


def _bursts(rng: random.Random, duration_s: float) -> list[tuple[float, float]]:
    """Non-overlapping bursts; their lengths shrink with a compressed day."""
    scale = duration_s / DAY_S
    out: list[tuple[float, float]] = []
    for _ in range(max(1, round(BURSTS_PER_DAY * scale))):
        start = rng.uniform(0, duration_s)
        out.append((start, min(duration_s, start + rng.expovariate(1 / BURST_MEAN_S) * scale)))
    out.sort()
    merged: list[tuple[float, float]] = []
    for s, e in out:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def _output(rng: random.Random) -> int:
    return max(1, min(MAX_OUTPUT_TOKENS, round(_draw(rng, "output_tokens"))))


def _draw(rng: random.Random, name: str) -> float:
    """Inverse-CDF sample from a calibration table (log-linear between quantiles)."""
    table = _CALIBRATION[name]
    u = rng.random()
    i = min(bisect.bisect_right(_Q, u) - 1, len(_Q) - 2)
    frac = (u - _Q[i]) / (_Q[i + 1] - _Q[i])
    lo, hi = max(table[i], 1e-3), max(table[i + 1], 1e-3)
    return math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))


def _accumulate(values: Iterator[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total
