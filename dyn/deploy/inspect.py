"""Read-only views for the CLI: status, the list of deployments, process logs.

`status` asks the daemon; when the daemon cannot answer it still reports
what the snapshot on disk says (state "unreachable"), so an operator always
sees which processes exist and where.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from dyn.deploy.client import DaemonUnreachable, request
from dyn.errors import DeploymentError
from dyn.planner.daemon_proc import daemon_alive
from dyn.planner.state import StateStore, client_urls, list_deployments


def resolve_name(name: str | None, *, missing_ok: bool = False) -> str | None:
    """The named deployment, or the only one there is; None when none exist and missing_ok."""
    if name:
        return name
    names = list_deployments()
    if len(names) == 1:
        return names[0]
    if not names:
        if missing_ok:
            return None
        raise DeploymentError("no deployments in the state directory (start one with `dyn up`)")
    raise DeploymentError(f"{len(names)} deployments exist ({', '.join(names)}); pick one with --name")


def status(name: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    return asyncio.run(status_async(name, timeout_s=timeout_s))


async def status_async(name: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    store = StateStore(name)
    deployment = store.load_deployment()
    try:
        return await request(store, "status", timeout_s=timeout_s)
    except DaemonUnreachable as exc:
        snapshot = store.load_snapshot()
        why = "daemon process is gone" if not daemon_alive(store) else str(exc)
        ended = snapshot is not None and snapshot.phase == "ended"  # e.g. its Slurm allocation ended
        return {
            "name": name, "state": "ended" if ended else "unreachable", "error": snapshot.error if ended else why,
            "frontend_url": client_urls(deployment, snapshot)[0],
            "uptime_s": round(time.time() - deployment.created_at, 3), "config_hash": deployment.config_hash,
            "workers": [{"id": p.id, "role": p.role, "node": p.node, "pid": p.pid, "gpus": list(p.gpus),
                         "state": f"{p.state} (last known)", "heartbeat_age_s": None, "restarts": p.num_restarts,
                         "log_path": p.log_path} for p in (snapshot.processes if snapshot else ())],
            "events": [], "daemon": {},
        }


def list_all() -> list[dict[str, Any]]:
    """One row per deployment in the state directory, from disk only (fast, works offline)."""
    rows = []
    for name in list_deployments():
        store = StateStore(name)
        try:
            d = store.load_deployment()
        except DeploymentError as exc:
            rows.append({"name": name, "state": "corrupt", "error": str(exc)})
            continue
        snapshot = store.load_snapshot()
        phase = snapshot.phase if snapshot else "starting"
        if not daemon_alive(store):
            phase = f"{phase} (daemon down)"
        rows.append({"name": name, "state": phase, "frontend_url": " ".join(client_urls(d, snapshot)), "head": d.head,
                     "recipe": d.recipe_source, "topology": d.topology_source, "created_at": d.created_at,
                     "num_processes": len(snapshot.processes) if snapshot else 0})
    return rows


async def log_chunks(name: str, process: str, *, num_lines: int = 50, follow: bool = False,
                     poll_s: float = 0.5) -> AsyncIterator[str]:
    """The end of a process's log ("daemon" for the daemon's), then, with follow, what it appends."""
    store = StateStore(name)
    deployment = store.load_deployment()
    if process == "daemon":
        node, path = deployment.head, str(store.daemon_log_path)
    else:
        snapshot = store.load_snapshot()
        known = {p.id: p for p in (snapshot.processes if snapshot else ())}
        record = known.get(process)
        if record is None or not record.log_path:
            names = ", ".join(["daemon", *sorted(known)])
            raise DeploymentError(f"deployment {name!r} has no process {process!r} with a log (known: {names})")
        node, path = record.node, record.log_path
    from dyn.config.loader import parse_topology
    from dyn.planner.nodes import LaunchNodes

    topology = parse_topology(deployment.topology_text, deployment.topology_source)
    async with LaunchNodes(topology, accept_new_host_keys=deployment.accept_new_host_keys) as nodes:
        text = await nodes.tail(node, path, num_lines)
        yield text
        offset = await nodes.size(node, path)
        while follow:
            await asyncio.sleep(poll_s)
            chunk = await nodes.read_from(node, path, offset)
            if chunk:
                offset += len(chunk.encode())
                yield chunk
