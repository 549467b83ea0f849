"""`dyn logs --request ID`: one request's lines from every process's JSON log, in time order.

Every process logs JSON lines (dyn.logs) and tags request-scoped lines with
`request_id`. Following a request means reading each process's log on its
node (the daemon's too), keeping the lines with that id and merging them by
timestamp. Lines that are not JSON (a crash's raw traceback) are skipped.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Iterable

from dyn.control.requests import ATTEMPT_SEPARATOR
from dyn.errors import DeploymentError
from dyn.planner.state import StateStore


@dataclass(frozen=True, slots=True)
class TraceLine:
    ts: float
    process: str
    level: str
    msg: str
    entry: dict[str, Any]

    def render(self) -> str:
        import time

        stamp = time.strftime("%H:%M:%S", time.localtime(self.ts)) + f".{int(self.ts % 1 * 1000):03d}"
        return f"{stamp} {self.process:<12} {self.level:<7} {self.msg}"


class RequestNotFound(DeploymentError):
    """No process logged a line with this request id."""

    def __init__(self, name: str, request_id: str, num_logs: int) -> None:
        self.name, self.request_id, self.num_logs = name, request_id, num_logs
        super().__init__(f"deployment {name!r}: no line with request_id {request_id!r} in {num_logs} process "
                         "logs (ids are the client's X-Request-Id or the id in the response; logs may "
                         "have been rotated)")


_PUBLIC_PREFIXES = ("chatcmpl-", "cmpl-")


def request_ids(request_id: str) -> frozenset[str]:
    """The id as given, plus the internal id behind an OpenAI response id ("chatcmpl-<id>")."""
    ids = {request_id}
    for prefix in _PUBLIC_PREFIXES:
        if request_id.startswith(prefix) and len(request_id) > len(prefix):
            ids.add(request_id[len(prefix):])
    return frozenset(ids)


def request_lines(text: str, request_id: str, process: str) -> list[TraceLine]:
    """The lines of one log that carry `request_id` (or its internal form, see request_ids),
    including a worker's lines of a later attempt there ("<id>#<n>", marked in the message)."""
    ids = request_ids(request_id)
    out = []
    for line in text.splitlines():
        if not any(i in line for i in ids):  # cheap pre-filter before json.loads
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(rid := entry.get("request_id"), str):
            continue
        base, attempt, num = rid.partition(ATTEMPT_SEPARATOR)
        if base in ids:
            msg = str(entry.get("msg", "")) + (f" (attempt {attempt}{num} there)" if attempt else "")
            out.append(TraceLine(float(entry.get("ts") or 0.0), str(entry.get("process") or process),
                                 str(entry.get("level", "")), msg, entry))
    return out


def merge(groups: Iterable[list[TraceLine]]) -> list[TraceLine]:
    return sorted((line for group in groups for line in group), key=lambda line: line.ts)


async def follow_request(name: str, request_id: str) -> list[TraceLine]:
    """Every logged line of one request across the deployment, oldest first."""
    from dyn.config.loader import parse_topology
    from dyn.planner.nodes import LaunchNodes

    if not request_id or len(request_id) > 256:
        raise DeploymentError(f"bad request id {request_id!r}: give 1-256 characters")
    store = StateStore(name)
    deployment = store.load_deployment()
    snapshot = store.load_snapshot()
    logs = [("daemon", deployment.head, str(store.daemon_log_path))]
    logs += [(p.id, p.node, p.log_path) for p in (snapshot.processes if snapshot else ()) if p.log_path]
    topology = parse_topology(deployment.topology_text, deployment.topology_source)
    async with LaunchNodes(topology, accept_new_host_keys=deployment.accept_new_host_keys) as nodes:
        texts = await asyncio.gather(*(nodes.read_from(node, path, 0) for _, node, path in logs),
                                     return_exceptions=True)
    groups = [request_lines(text, request_id, process) for (process, _, _), text in zip(logs, texts)
              if isinstance(text, str)]
    lines = merge(groups)
    if not lines:
        raise RequestNotFound(name, request_id, len(logs))
    return lines
