"""`dyn down`, library side: stop a deployment and forget it; idempotent.

Normal path: ask the daemon to drain and stop everything, wait for it to
exit, then verify from the snapshot that no process survived. Force path
(daemon dead or unresponsive, `--force`): kill the daemon, then every
process listed in the snapshot over SSH, by process group, after checking
that the pid still runs *our* command line (pids get reused).
The state is removed only once nothing of the deployment is alive.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import NamedTuple

from dyn.deploy.client import DaemonUnreachable, request
from dyn.errors import DeploymentError, DynError
from dyn.launch.local import pid_alive
from dyn.planner.daemon_proc import daemon_pid, kill_local
from dyn.planner.state import ProcessRecord, StateStore, one_per_process


class DownResult(NamedTuple):
    name: str
    was_running: bool
    num_killed: int
    """Processes the CLI had to kill itself (0 when the daemon stopped everything)."""
    forced: bool


def down(name: str, *, force: bool = False, timeout_s: float = 30.0) -> DownResult:
    return asyncio.run(down_async(name, force=force, timeout_s=timeout_s))


async def down_async(name: str, *, force: bool = False, timeout_s: float = 30.0) -> DownResult:
    store = StateStore(name)
    if not store.exists():
        if store.dir.exists():  # keys written by an `up` that never got further
            store.remove()
        return DownResult(name, False, 0, force)
    pid = daemon_pid(store)
    if not force:
        try:
            await request(store, "down", {"timeout_s": timeout_s}, timeout_s=5.0)
        except DaemonUnreachable as exc:
            if pid is not None and pid_alive(pid):
                raise DeploymentError(f"{exc}; it is still running as pid {pid}: "
                                      f"`dyn down --name {name} --force` kills it and every process") from None
            force = True  # the daemon is dead: nobody else will stop its processes
        else:
            if pid is not None and not await _wait_gone(pid, timeout_s + 10.0):
                force = True
    if pid is not None and pid_alive(pid):
        kill_local(pid, signal.SIGTERM)
        if not await _wait_gone(pid, 5.0):
            kill_local(pid, signal.SIGKILL)
            await _wait_gone(pid, 5.0)
    num_killed = await _kill_leftovers(store)
    num_killed += await _end_slurm_steps(store)
    store.remove()
    return DownResult(name, True, num_killed, force)


async def _kill_leftovers(store: StateStore) -> int:
    """Kill every snapshot process still alive (TERM, then KILL); raise if any survives."""
    snapshot = store.load_snapshot()
    if snapshot is not None and snapshot.phase in ("stopped", "ended"):
        return 0  # the daemon saw every pid gone (or their Slurm allocation end) before it exited
    records = [r for r in (snapshot.processes if snapshot else ()) if r.pid is not None]
    if not records:
        return 0
    from dyn.config.loader import parse_topology
    from dyn.planner.nodes import LaunchNodes

    deployment = store.load_deployment()
    topology = parse_topology(deployment.topology_text, deployment.topology_source)
    nodes = LaunchNodes(topology, accept_new_host_keys=deployment.accept_new_host_keys,
                        node_state_root=deployment.node_state_root, deployment=deployment.name)
    async with nodes:
        alive, unreachable = await _owned(nodes, records)
        killed = len(one_per_process(alive))
        for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
            if not alive:
                break
            await asyncio.gather(*(nodes.kill(r.node, r.pid, sig) for r in one_per_process(alive)),
                                 return_exceptions=True)
            deadline = time.monotonic() + grace_s
            while alive and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                alive, more = await _owned(nodes, alive)
                unreachable.update(more)
        await asyncio.gather(*(_remove_secrets(nodes, r) for r in records if r.node not in unreachable),
                             return_exceptions=True)
    problems = [f"{r.id} (pid {r.pid} on {r.node}) is still alive after SIGKILL" for r in alive]
    problems += [f"node {node}: cannot check or kill its processes ({why})" for node, why in unreachable.items()]
    if problems:
        raise DeploymentError(f"deployment {store.name!r}: " + "; ".join(problems) +
                              "; the state is kept so `dyn down --force` can retry")
    return killed


async def _end_slurm_steps(store: StateStore) -> int:
    """A deployment in a Slurm allocation: no step of it may outlive `dyn down`."""
    from dyn.config.loader import parse_topology
    from dyn.planner.nodes import LaunchNodes

    deployment = store.load_deployment()
    topology = parse_topology(deployment.topology_text, deployment.topology_source)
    if topology.launch != "slurm":
        return 0
    async with LaunchNodes(topology, deployment=deployment.name) as nodes:
        try:
            return len(await nodes.end_leftover_steps())
        except DynError as exc:
            raise DeploymentError(f"deployment {store.name!r}: cannot check its Slurm steps ({exc}); "
                                  "the state is kept so `dyn down --force` can retry") from None


async def _owned(nodes, records: list[ProcessRecord]) -> tuple[list[ProcessRecord], dict[str, str]]:
    """Records whose process still runs, and {node: error} for nodes that could not be asked."""
    by_node: dict[str, list[ProcessRecord]] = {}
    for r in records:
        by_node.setdefault(r.node, []).append(r)
    names = list(by_node)
    results = await asyncio.gather(*(nodes.owned(n, {r.pid: r.config_path or r.id for r in by_node[n]})
                                     for n in names), return_exceptions=True)
    alive: list[ProcessRecord] = []
    unreachable: dict[str, str] = {}
    for node, result in zip(names, results):
        if isinstance(result, BaseException):
            unreachable[node] = str(result).splitlines()[0][:200]
        else:
            alive.extend(r for r in by_node[node] if r.pid in result)
    return alive, unreachable


async def _remove_secrets(nodes, record: ProcessRecord) -> None:
    """Key and config files hold CURVE secrets: delete them; logs stay for post-mortems."""
    if record.config_path:
        await nodes.remove(record.node, [record.config_path,
                                         record.config_path.removesuffix(".json") + ".keys.json"])


async def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
