"""Bearer-token auth of the HTTP API (recipe `auth.api_keys_file`).

The file holds no tokens, only their SHA-256 digests, one per line as
`sha256:<64 hex digits>` (blank lines and `#` comments allowed), so a copy
of it grants nothing. A request's `Authorization: Bearer <token>` is hashed
and looked up; /health and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dyn.errors import ConfigError

_LINE = re.compile(r"sha256:([0-9a-f]{64})")


def hash_api_key(token: str) -> str:
    """The line to put in the keys file for `token`."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def load_api_keys(path: str | Path) -> frozenset[str]:
    """Digests (hex) from a keys file; ConfigError names the file and line of a bad entry."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file: {exc.strerror}", path=str(p),
                          field="auth.api_keys_file") from None
    digests = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ConfigError("expected 'sha256:<64 lowercase hex digits>' (keys are stored hashed)",
                              path=str(p), line=number, hint="make a line with dyn.frontend.auth.hash_api_key")
        digests.add(match.group(1))
    if not digests:
        raise ConfigError("the API keys file lists no keys; every request would be refused", path=str(p))
    return frozenset(digests)


def is_authorized(header: str | None, digests: frozenset[str]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hashlib.sha256(header[7:].strip().encode()).hexdigest() in digests
