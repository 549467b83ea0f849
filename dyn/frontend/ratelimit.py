"""Per-tenant request rate limits: one token bucket per tenant.

A bucket holds up to `burst` tokens (max(1, rate)) and refills at `rate_rps`;
each request takes one. An empty bucket answers how long until the next
token, which becomes the 429's Retry-After. The clock is injected for tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from dyn.frontend.auth import Tenant
from dyn.frontend.protocol import ApiError


@dataclass(slots=True)
class TokenBucket:
    rate_rps: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; returns 0.0 when granted, else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_rps)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_rps


@dataclass(slots=True)
class RateLimiter:
    clock: Callable[[], float] = time.monotonic
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    num_limited: dict[str, int] = field(default_factory=dict)

    def check(self, tenant: Tenant) -> None:
        """Admit one request of `tenant` or raise ApiError 429 with Retry-After."""
        if tenant.rate_rps is None:
            return
        now = self.clock()
        bucket = self.buckets.get(tenant.name)
        if bucket is None:
            burst = max(1.0, tenant.rate_rps)
            bucket = self.buckets[tenant.name] = TokenBucket(tenant.rate_rps, burst, burst, now)
        wait_s = bucket.take(now)
        if wait_s > 0.0:
            self.num_limited[tenant.name] = self.num_limited.get(tenant.name, 0) + 1
            raise ApiError(f"tenant {tenant.name!r} exceeded its rate limit of {tenant.rate_rps:g} "
                           f"requests/s; retry in {wait_s:.2f} s", status=429, code="rate_limit_exceeded",
                           type="rate_limit_error", retry_after_s=max(1.0, math.ceil(wait_s)))
