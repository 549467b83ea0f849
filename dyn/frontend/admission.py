"""Admission control: refuse what cannot meet the TTFT target instead of queueing it.

Estimated TTFT on the worker that would prefill the prompt:

    queue_s = waiting prefill tokens on that worker / its profiled prefill throughput
    own_s   = prefill time of this prompt's uncached tokens (chunked by the step budget)
    ttft_s  = queue_s + own_s

Waiting tokens are the larger of the worker's heartbeat figure and this
frontend's own count of prompt tokens sent there that have not produced a
first token yet (fresher than a heartbeat). Normal requests are admitted
while ttft_s <= target; priority requests (dyn.priority > 0) up to 2x the
target, so under pressure they get in first. Refusals carry Retry-After:
about the time for the queue to drain back under the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from dyn.engine.profile import EngineProfile
from dyn.frontend.protocol import ApiError

PRIORITY_SLACK = 2.0
"""Priority requests may exceed the TTFT target up to this factor."""


class Estimate(NamedTuple):
    ttft_s: float
    queue_s: float
    own_s: float


@dataclass(frozen=True, slots=True)
class Admission:
    profile: EngineProfile
    ttft_target_s: float

    def estimate(self, role: str, waiting_tokens: int, uncached_tokens: int) -> Estimate:
        """TTFT of a prompt with `uncached_tokens` to prefill on a worker of `role`."""
        rp = self.profile.role(role)
        budget = rp.max_num_batched_tokens  # seconds per token at full steps (0 for a free prefill)
        queue_s = max(waiting_tokens, 0) * rp.prefill_step_s(budget) / budget
        own_s = rp.prompt_prefill_s(max(uncached_tokens, 0))
        return Estimate(queue_s + own_s, queue_s, own_s)

    def check(self, worker_id: str, role: str, waiting_tokens: int, uncached_tokens: int,
              priority: int) -> Estimate:
        """The estimate when admitted; ApiError 429 with Retry-After when not."""
        est = self.estimate(role, waiting_tokens, uncached_tokens)
        limit = self.ttft_target_s * (PRIORITY_SLACK if priority > 0 else 1.0)
        if est.ttft_s <= limit:
            return est
        retry_after_s = max(1.0, math.ceil(est.ttft_s - limit))
        raise ApiError(f"the deployment cannot start this request within its TTFT target: estimated "
                       f"{est.ttft_s * 1000:.0f} ms on {worker_id} ({waiting_tokens} prompt tokens "
                       f"queued, {uncached_tokens} to prefill) > {limit * 1000:.0f} ms; retry after "
                       f"{retry_after_s:.0f} s", status=429, code="ttft_target_exceeded",
                       type="rate_limit_error", retry_after_s=retry_after_s)
