"""Bearer-token auth of the HTTP API (recipe `auth.api_keys_file`), one tenant per key.

The file holds no tokens, only their SHA-256 digests, so a copy of it grants
nothing. One key per line (blank lines and `#` comments allowed):

    sha256:<64 hex digits> [tenant-name [rate_rps]]

A key without a tenant name belongs to tenant "default"; without a rate it
is unlimited. Several keys may name the same tenant (they then share one
rate limit and one cache salt; the first rate given wins, and two different
rates for one tenant are an error). /health and /metrics stay open.

Each tenant's KV blocks are salted with a 63-bit value derived from its name
(`tenant_salt`), the same domain as dyn.kv.hashing salts: identical prompts
of two tenants hash to different blocks, so one tenant can never observe
another's prompts through cache-hit timing.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from dyn.errors import ConfigError
from dyn.kv.hashing import HASH_MASK

DEFAULT_TENANT = "default"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    rate_rps: float | None = None
    """Requests per second allowed (token bucket, burst of max(1, rate)); None: unlimited."""


@dataclass(frozen=True, slots=True)
class ApiKeys:
    by_digest: dict[str, Tenant]
    """SHA-256 hex digest of a token -> its tenant."""

    @property
    def tenants(self) -> dict[str, Tenant]:
        return {t.name: t for t in self.by_digest.values()}

    def authenticate(self, header: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <token>` header; None: missing or unknown."""
        if not header or not header.startswith("Bearer "):
            return None
        return self.by_digest.get(hashlib.sha256(header[7:].strip().encode()).hexdigest())


def hash_api_key(token: str) -> str:
    """The line to put in the keys file for `token` (append ` tenant [rate_rps]`)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def tenant_salt(name: str) -> int:
    """The KV-hash salt of a tenant: stable across processes, in [1, 2**63)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=b"dyn-tnt1").digest()
    return (int.from_bytes(digest, "little") & HASH_MASK) or 1


def adapter_salt(salt: int, adapter: str) -> int:
    """A tenant's salt (0: shared) for the requests of one LoRA adapter: its KV blocks (the same
    tokens, other values) never match the base model's or another adapter's."""
    digest = hashlib.blake2b(f"{salt}:{adapter}".encode(), digest_size=8, person=b"dyn-lora").digest()
    return (int.from_bytes(digest, "little") & HASH_MASK) or 1


def load_api_keys(path: str | Path) -> ApiKeys:
    """Parse a keys file; ConfigError names the file and line of a bad entry."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file: {exc.strerror}", path=str(p),
                          field="auth.api_keys_file") from None
    by_digest: dict[str, Tenant] = {}
    rates: dict[str, tuple[float | None, int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        digest, name, rate = _parse_line(line, p, number)
        if name in rates and rates[name][0] != rate and rate is not None:
            raise ConfigError(f"tenant {name!r} is given rate {rate:g} here but "
                              f"{rates[name][0]} on line {rates[name][1]}", path=str(p), line=number,
                              hint="give the rate once, or the same rate on every key of the tenant")
        if name not in rates or rates[name][0] is None:
            rates[name] = (rate, number)
        if digest in by_digest:
            raise ConfigError("this key is listed twice", path=str(p), line=number)
        by_digest[digest] = Tenant(name)
    if not by_digest:
        raise ConfigError("the API keys file lists no keys; every request would be refused", path=str(p))
    return ApiKeys({d: Tenant(t.name, rates[t.name][0]) for d, t in by_digest.items()})


def _parse_line(line: str, p: Path, number: int) -> tuple[str, str, float | None]:
    parts = line.split()
    match = _DIGEST.fullmatch(parts[0])
    if match is None:
        raise ConfigError("expected 'sha256:<64 lowercase hex digits> [tenant [rate_rps]]' "
                          "(keys are stored hashed)", path=str(p), line=number,
                          hint="make a line with dyn.frontend.auth.hash_api_key")
    if len(parts) > 3:
        raise ConfigError(f"expected at most 3 fields (digest, tenant, rate_rps), got {len(parts)}",
                          path=str(p), line=number)
    name = parts[1] if len(parts) > 1 else DEFAULT_TENANT
    if not _TENANT.fullmatch(name):
        raise ConfigError(f"bad tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-'",
                          path=str(p), line=number)
    rate = None
    if len(parts) == 3:
        try:
            rate = float(parts[2])
        except ValueError:
            rate = math.nan
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"rate_rps must be a positive number of requests per second, got "
                              f"{parts[2]!r}", path=str(p), line=number)
    return match.group(1), name, rate
