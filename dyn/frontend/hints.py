"""Agent hints: our `dyn` object and Dynamo's `nvext` shape, parsed into one `Hints`.

    dyn:   {priority, latency_sensitive, expected_output_tokens | osl, session_id,
            session_ttl_s, close_session, retention: {priority, ttl_s},
            speculative_prefill, ignore_eos}
    nvext: {agent_hints: {priority, osl, speculative_prefill, latency_sensitivity},
            session_control: {session_id, action: bind | close, timeout_seconds}}
    header X-Dynamo-Session-ID (or X-Dyn-Session-Id): the session id (app.py)

A client written for Dynamo works unchanged. `nvext.agent_hints.priority`
follows vLLM's convention (smaller is more urgent; Dynamo forwards it to
vLLM as is), so it becomes dyn priority -p; `latency_sensitivity` (seconds)
> 0 makes the request latency-sensitive. Where `dyn` and `nvext` both set a
hint, `dyn` wins. Unknown fields inside these objects are ignored and
returned so the frontend can count them; a known field of the wrong type
or range is a 400 naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dyn.frontend.api_error import ApiError

MAX_PRIORITY = 1000
MAX_SESSION_ID_CHARS = 256
_DYN_KEYS = frozenset({"priority", "latency_sensitive", "expected_output_tokens", "osl", "session_id",
                       "session_ttl_s", "close_session", "retention", "speculative_prefill",
                       "ignore_eos"})
_AGENT_KEYS = frozenset({"priority", "osl", "speculative_prefill", "latency_sensitivity"})
_SESSION_KEYS = frozenset({"session_id", "action", "timeout_seconds"})
_NVEXT_KEYS = frozenset({"agent_hints", "session_control"})
_RETENTION_KEYS = frozenset({"priority", "ttl_s"})


@dataclass(frozen=True, slots=True)
class RetentionHint:
    """`dyn.retention` as sent; None fields take the recipe's kv_tiers.retention_* defaults."""

    priority: int | None = None
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class Hints:
    """What the client told us about a request, from `dyn`, `nvext` and the session header."""

    priority: int = 0
    """Higher is more urgent: admission, engine order and preemption, router tie-breaks."""
    latency_sensitive: bool = False
    expected_output_tokens: int | None = None
    """Router decode-load estimate; the planner's decode demand."""
    session_id: str | None = None
    session_ttl_s: float | None = None
    """Affinity lifetime for this session (None: router.session_ttl_s)."""
    close_session: bool = False
    """This is the session's last turn: afterwards its affinity and retention are released."""
    retention: RetentionHint | None = None
    """Keep this request's KV blocks at a priority / for a TTL in every tier."""
    speculative_prefill: bool = False
    """After the answer, prefill conversation + answer where the next turn will go."""
    ignore_eos: bool | None = None


NO_HINTS = Hints()
"""A body without `dyn` or `nvext` (frozen, so one instance serves every such request)."""


def parse_hints(body: dict) -> tuple[Hints, tuple[str, ...]]:
    """Hints from a request body; returns (hints, unknown field paths)."""
    if "dyn" not in body and "nvext" not in body:  # most requests: every field at its default
        return NO_HINTS, ()
    unknown: list[str] = []
    ext = _object(body, "dyn", "dyn")
    nvext = _object(body, "nvext", "nvext")
    agent = _object(nvext, "agent_hints", "nvext.agent_hints")
    session = _object(nvext, "session_control", "nvext.session_control")
    for obj, known, where in ((ext, _DYN_KEYS, "dyn"), (nvext, _NVEXT_KEYS, "nvext"),
                              (agent, _AGENT_KEYS, "nvext.agent_hints"),
                              (session, _SESSION_KEYS, "nvext.session_control")):
        unknown.extend(f"{where}.{key}" for key in obj if key not in known)

    nv_priority = _int(agent, "priority", "nvext.agent_hints.priority", -MAX_PRIORITY, MAX_PRIORITY)
    priority = _int(ext, "priority", "dyn.priority", -MAX_PRIORITY, MAX_PRIORITY)
    if priority is None:
        priority = -nv_priority if nv_priority is not None else 0
    sensitivity = _number(agent, "latency_sensitivity", "nvext.agent_hints.latency_sensitivity", 0.0)
    latency_sensitive = _bool(ext, "latency_sensitive", "dyn.latency_sensitive")
    if latency_sensitive is None:
        latency_sensitive = bool(sensitivity)
    osl = _int(ext, "expected_output_tokens", "dyn.expected_output_tokens", 0, None)
    if osl is None:
        osl = _int(ext, "osl", "dyn.osl", 0, None)
    if osl is None:
        osl = _int(agent, "osl", "nvext.agent_hints.osl", 0, None)
    speculative = _bool(ext, "speculative_prefill", "dyn.speculative_prefill")
    if speculative is None:
        speculative = _bool(agent, "speculative_prefill", "nvext.agent_hints.speculative_prefill")

    session_id = _str(ext, "session_id", "dyn.session_id")
    nv_session = _str(session, "session_id", "nvext.session_control.session_id")
    action = _str(session, "action", "nvext.session_control.action")
    if action is not None and action not in ("bind", "open", "close"):
        raise ApiError(f"'action' must be 'bind' or 'close', got {action!r}",
                       param="nvext.session_control.action")
    ttl = _number(ext, "session_ttl_s", "dyn.session_ttl_s", 0.0, positive=True)
    if ttl is None:
        ttl = _number(session, "timeout_seconds", "nvext.session_control.timeout_seconds", 0.0,
                      positive=True)
    close = _bool(ext, "close_session", "dyn.close_session")
    if close is None:
        close = action == "close"
    hints = Hints(
        priority=priority, latency_sensitive=latency_sensitive, expected_output_tokens=osl,
        session_id=session_id or nv_session, session_ttl_s=ttl, close_session=close,
        retention=_retention(ext, unknown), speculative_prefill=bool(speculative),
        ignore_eos=_bool(ext, "ignore_eos", "dyn.ignore_eos"))
    return hints, tuple(unknown)


def with_session(hints: Hints, session_id: str | None) -> Hints:
    """Hints with the session id from a header when the body named none."""
    if session_id is None or hints.session_id is not None:
        return hints
    if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
        raise ApiError(f"the session header must be 1-{MAX_SESSION_ID_CHARS} characters",
                       param="X-Dynamo-Session-ID")
    from dataclasses import replace

    return replace(hints, session_id=session_id)


def _retention(ext: dict, unknown: list[str]) -> RetentionHint | None:
    raw = _object(ext, "retention", "dyn.retention")
    if "retention" not in ext:
        return None
    unknown.extend(f"dyn.retention.{key}" for key in raw if key not in _RETENTION_KEYS)
    priority = _int(raw, "priority", "dyn.retention.priority", 0, MAX_PRIORITY)
    ttl_s = _number(raw, "ttl_s", "dyn.retention.ttl_s", 0.0, positive=True)
    return RetentionHint(priority, ttl_s)


def _object(body: dict, key: str, param: str) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(f"'{key}' must be an object, got {type(value).__name__}", param=param)
    return value


def _int(body: dict, key: str, param: str, lo: int | None, hi: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"'{key}' must be an integer, got {type(value).__name__}", param=param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(f"'{key}' must be {bounds}, got {value}", param=param)
    return value


def _number(body: dict, key: str, param: str, lo: float, *, positive: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(f"'{key}' must be a number, got {type(value).__name__}", param=param)
    if value < lo or (positive and value <= lo):
        raise ApiError(f"'{key}' must be {'>' if positive else '>='} {lo:g}, got {value}", param=param)
    return float(value)


def _bool(body: dict, key: str, param: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ApiError(f"'{key}' must be a boolean, got {type(value).__name__}", param=param)
    return value


def _str(body: dict, key: str, param: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SESSION_ID_CHARS:
        raise ApiError(f"'{key}' must be a string of 1 to {MAX_SESSION_ID_CHARS} characters",
                       param=param)
    return value
