"""Router errors: each carries the fields a caller needs to answer or log it."""

from __future__ import annotations

from dyn.errors import DynError


class RouterError(DynError):
    """Base of every error raised by dyn.router."""


class KvEventError(RouterError):
    """A KV event batch or snapshot is malformed; the batch is rejected whole.

    `worker_id`, `seq` and `event_idx` (position in the batch, None for the
    batch itself) locate the bad input; `field` names the offending field.
    """

    def __init__(self, message: str, *, worker_id: str, seq: int | None = None,
                 event_idx: int | None = None, field: str | None = None) -> None:
        self.worker_id = worker_id
        self.seq = seq
        self.event_idx = event_idx
        self.field = field
        where = f"KV events from worker {worker_id!r}"
        if seq is not None:
            where += f" seq {seq}"
        if event_idx is not None:
            where += f" event #{event_idx}"
        if field:
            where += f" field {field!r}"
        super().__init__(f"{where}: {message}")


class NoWorkerError(RouterError):
    """No candidate can take the request (all unhealthy, full or of the wrong role).

    `reasons` maps each rejected worker id to why; the frontend answers 503
    when none is healthy and 429 when all are full (`all_full`).
    """

    def __init__(self, message: str, *, role: str | None, reasons: dict[str, str]) -> None:
        self.role = role
        self.reasons = reasons
        self.all_full = bool(reasons) and all(r.startswith("queue full") for r in reasons.values())
        detail = "; ".join(f"{w}: {r}" for w, r in list(reasons.items())[:8])
        more = f" (+{len(reasons) - 8} more)" if len(reasons) > 8 else ""
        super().__init__(f"{message}{': ' + detail + more if detail else ''}")


class RouteInputError(RouterError):
    """A route request or worker load report carries an invalid value (`field`)."""

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
