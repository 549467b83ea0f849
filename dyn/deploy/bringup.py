"""`dyn up`, library side: validate, place, check every node, then start the daemon and watch it.

Everything that can fail fast fails before a process starts: the files are
parsed, placement is computed and every node is reached over SSH (all at
once; every unreachable node is reported, not just the first). Then the
keys and the deployment record are written, the daemon is started on the
head node, and its status is polled until every process is ready or one
failed. On failure everything started is stopped (unless keep_partial) and
the error names each failed process, its node and the end of its log.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, get_args

from dyn.config.recipe import RouterPolicy
from dyn.control.keys import DeploymentKeys, write_private
from dyn.deploy.client import DaemonUnreachable, request
from dyn.errors import ConfigError, DeploymentError, LaunchError
from dyn.planner.daemon_proc import daemon_alive, start_local_daemon
from dyn.planner.health import Deadlines
from dyn.planner.state import Deployment, StateStore, check_name, config_hash

Progress = Callable[[dict[str, Any]], None]
Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class UpOptions:
    topology_path: str | None = None
    """A path, or a shipped name (`local`); None: topologies/local.yaml."""
    recipe_path: str | None = None
    """A path, or a shipped name (`tiny-local`); None: recipes/smollm2-local.yaml."""
    name: str | None = None
    accept_new_host_keys: bool = False
    dyn_command: tuple[str, ...] | None = None
    """How to run dyn on the nodes; None: this interpreter locally, `dyn` on remote nodes."""
    router_policy: str | None = None
    keep_partial: bool = False
    assume_yes: bool = False
    node_state_root: str | None = None
    """Run-dir root on every node (tests); None: `$HOME/.local/state/dyn` on each node."""
    timeouts: dict[str, float] = field(default_factory=dict)
    """Overrides of dyn.planner.health.Deadlines."""
    slurm: bool = False
    """Run inside the current Slurm allocation (job steps, not SSH); also when the topology says
    `launch: slurm`. Without a topology, one is written for the allocation."""


class UpResult(NamedTuple):
    name: str
    frontend_url: str
    status: dict[str, Any]
    already_running: bool
    elapsed_s: float
    adopted: int | None = None
    """Set when a dead daemon was restarted: the processes it took over."""


class BringupFailed(DeploymentError):
    """One or more processes did not come up; `failures` holds one LaunchError each."""

    def __init__(self, name: str, failures: list[LaunchError], *, stopped: bool) -> None:
        self.name = name
        self.failures = failures
        self.stopped = stopped
        tail = "everything it started was stopped" if stopped else \
            f"left running for inspection (--keep-partial); `dyn down --name {name}` removes it"
        body = "\n".join(str(f) for f in failures)
        super().__init__(f"deployment {name!r} failed to come up ({tail}):\n{body}")


def up(options: UpOptions, *, on_progress: Progress | None = None, confirm: Confirm | None = None) -> UpResult:
    return asyncio.run(up_async(options, on_progress=on_progress, confirm=confirm))


async def up_async(options: UpOptions, *, on_progress: Progress | None = None,
                   confirm: Confirm | None = None) -> UpResult:
    from dyn.config.loader import parse_recipe, parse_topology, resolve_file
    from dyn.config.scaling import scale_to_topology
    from dyn.topology.frontends import place_frontends
    from dyn.topology.placement import place

    started = time.monotonic()
    if options.slurm and options.topology_path is None:
        topology_path = None
    else:
        topology_path = str(resolve_file("topology", options.topology_path))
    if topology_path is None or options.slurm or _says_slurm(topology_path):
        from dyn.deploy.slurm import slurm_topology_file

        topology_path = await asyncio.to_thread(slurm_topology_file, topology_path, dict(os.environ))
    recipe_path = str(resolve_file("recipe", options.recipe_path))
    options = replace(options, topology_path=topology_path, recipe_path=recipe_path)
    topology_text = _read(topology_path, "topology")
    recipe_text = _read(recipe_path, "recipe")
    topology = parse_topology(topology_text, topology_path)
    recipe = scale_to_topology(parse_recipe(recipe_text, recipe_path), topology)
    deadlines = _deadlines(options.timeouts)
    if options.router_policy is not None and options.router_policy not in get_args(RouterPolicy):
        raise ConfigError(f"unknown router policy {options.router_policy!r}; "
                          f"choose one of {', '.join(get_args(RouterPolicy))}", field="--router")
    name = check_name(options.name or recipe.name)
    await asyncio.to_thread(_ensure_model, recipe)
    placement = place(topology, recipe)
    frontends = place_frontends(topology, recipe)
    options_key = {"router": options.router_policy}
    digest = config_hash(topology_text, recipe_text, options_key)
    store = StateStore(name)

    if store.exists():
        existing = await _existing(store, digest, options, confirm)
        if existing == "restart_daemon":
            old = store.load_deployment()
            await asyncio.to_thread(start_local_daemon, store, old.dyn_command)
            status = await _watch(store, deadlines, options, on_progress)
            adopted = sum(1 for w in status.get("workers", []) if w.get("state") == "ready")
            return UpResult(name, _url(status, old), status, False, time.monotonic() - started, adopted)
        if existing is not None:
            return existing._replace(elapsed_s=time.monotonic() - started)

    local_cmd = options.dyn_command or local_dyn_command()
    # Slurm nodes share the head's install (a cluster file system): the same absolute dyn runs there.
    remote_cmd = options.dyn_command or (tuple(local_cmd) if topology.launch == "slurm" else ("dyn",))
    used = sorted({topology.head, *(w.node for w in placement.workers)})
    head = topology.head_node
    # a Slurm node's address is its Slurm name; where it is reached is its bind_address (NodeAddr)
    head_address = head.bind_address if topology.launch == "slurm" else head.ssh.address
    if not head.ssh.is_local and not is_this_machine(head_address):
        raise DeploymentError(f"head node {topology.head!r} ({head_address}) is not this machine: run "
                              f"`dyn up` on {topology.head}" + (" (inside the allocation, e.g. in the sbatch "
                              "script or `srun --pty`)" if topology.launch == "slurm" else
                              ", or make the head node `address: local`"))
    await _check_nodes(topology, used, local_cmd, remote_cmd, options)

    ids = ["daemon", "cli", *(f.id for f in frontends), *(w.id for w in placement.workers)]
    keys = DeploymentKeys.generate(ids)
    store.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.save(store.keys_path)
    if recipe.auth.curve:
        write_private(store.cli_keys_path, keys.for_process("cli").to_json())
    else:  # the daemon listens without CURVE: a CLI offering a CURVE handshake would never hear back
        store.cli_keys_path.unlink(missing_ok=True)
    store.snapshot_path.unlink(missing_ok=True)
    deployment = Deployment(
        name=name, topology_text=topology_text, recipe_text=recipe_text,
        topology_source=str(options.topology_path), recipe_source=str(options.recipe_path),
        config_hash=digest, head=topology.head, dyn_command=tuple(local_cmd),
        remote_dyn_command=tuple(remote_cmd),
        frontend_url=f"http://{recipe.frontend.host}:{recipe.frontend.port}", created_at=time.time(),
        accept_new_host_keys=options.accept_new_host_keys, router_policy=options.router_policy,
        node_state_root=options.node_state_root, timeouts=dict(options.timeouts))
    store.save_deployment(deployment)
    await asyncio.to_thread(start_local_daemon, store, local_cmd)
    status = await _watch(store, deadlines, options, on_progress)
    return UpResult(name, _url(status, deployment), status, False, time.monotonic() - started)


def _url(status: dict[str, Any], deployment: Deployment) -> str:
    """The frontend URL the daemon reports (a recipe's port 0 is the port the frontend took)."""
    return status.get("frontend_url") or deployment.frontend_url


async def _watch(store: StateStore, deadlines: Deadlines, options: UpOptions,
                 on_progress: Progress | None) -> dict[str, Any]:
    """Poll the daemon until ready or failed; every wait has a deadline."""
    from dyn.deploy.teardown import down_async

    limit_s = deadlines.register_s + deadlines.load_s + 30.0
    deadline = time.monotonic() + limit_s
    status: dict[str, Any] = {}
    while True:
        if not daemon_alive(store):
            tail = _tail(store.daemon_log_path)
            await down_async(store.name, force=True)
            raise LaunchError("the planner daemon exited during bring-up", node="head",
                              process="daemon", log_tail=tail)
        try:
            status = await request(store, "status", timeout_s=5.0)
        except DaemonUnreachable:
            status = {}
        if status and on_progress is not None:
            on_progress(status)
        if status.get("state") in ("running", "degraded") and all(
                w.get("state") in ("ready", "gave_up") for w in status.get("workers", ())):
            return status
        if status.get("state") == "failed" or time.monotonic() > deadline:
            failures = _failures(await _with_log_tails(store, status), limit_s)
            if not options.keep_partial:
                await down_async(store.name, force=False, timeout_s=deadlines.stop_s + 10)
            raise BringupFailed(store.name, failures, stopped=not options.keep_partial)
        await asyncio.sleep(0.5)


async def _with_log_tails(store: StateStore, status: dict[str, Any], wait_s: float = 5.0) -> dict[str, Any]:
    """The daemon reads a failed process's log tail (over SSH for a remote node) just after marking it
    failed: wait a moment for it, so the report shows why without the operator going to find the log."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
            not w.get("log_tail") for w in status.get("workers", ()) if w.get("state") in ("failed", "gave_up")):
        await asyncio.sleep(0.25)
        try:
            status = await request(store, "status", timeout_s=5.0)
        except DaemonUnreachable:
            break
    return status


def _failures(status: dict[str, Any], limit_s: float) -> list[LaunchError]:
    workers = status.get("workers", [])
    failed = [w for w in workers if w.get("state") in ("failed", "gave_up")]
    if failed:
        return [LaunchError(w.get("error") or "failed", node=w.get("node"), process=w.get("id"),
                            log_tail=w.get("log_tail") or None) for w in failed]
    late = [w for w in workers if w.get("state") != "ready"]
    if not status:
        return [LaunchError(f"the daemon did not answer within {limit_s:.0f} s", process="daemon")]
    return [LaunchError(f"not ready after {limit_s:.0f} s (state {w.get('state')})", node=w.get("node"),
                        process=w.get("id")) for w in late]


def is_this_machine(address: str) -> bool:
    """Whether an address names this host (so `dyn up` on a rack's head tray runs the daemon here)."""
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_UDP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))  # only a local interface address can be bound
                return True
            except OSError:
                continue
    return False


async def _existing(store: StateStore, digest: str, options: UpOptions,
                    confirm: Confirm | None) -> UpResult | str | None:
    """A deployment of this name exists: report it unchanged, restart its dead daemon
    (which adopts the processes still running), or replace it after asking."""
    from dyn.deploy.teardown import down_async

    old = store.load_deployment()
    try:
        status = await request(store, "status", timeout_s=3.0)
    except DaemonUnreachable:
        status = None
    snapshot = store.load_snapshot()
    if (status is None and old.config_hash == digest and not daemon_alive(store) and snapshot is not None
            and snapshot.phase in ("running", "degraded")):
        return "restart_daemon"
    if status is not None and old.config_hash == digest and status.get("state") in ("running", "degraded",
                                                                                    "starting"):
        return UpResult(old.name, _url(status, old), status, True, 0.0)
    if status is not None and old.config_hash != digest:
        question = (f"deployment {old.name!r} is running with different files "
                    f"({_changes(old, options)}); replace it (down, then up)?")
        if not (options.assume_yes or (confirm is not None and confirm(question))):
            raise DeploymentError(question.replace("; replace it (down, then up)?", "") +
                                  "; nothing changed (pass -y to replace it)")
    await down_async(store.name, force=status is None)
    return None


def _changes(old: Deployment, options: UpOptions) -> str:
    parts = []
    if Path(options.topology_path).read_text() != old.topology_text:
        parts.append(f"topology {options.topology_path} changed")
    if Path(options.recipe_path).read_text() != old.recipe_text:
        parts.append(f"recipe {options.recipe_path} changed")
    if options.router_policy != old.router_policy:
        parts.append(f"router policy {old.router_policy} -> {options.router_policy}")
    return ", ".join(parts) or "options changed"


async def _check_nodes(topology, used: list[str], local_cmd, remote_cmd, options: UpOptions) -> None:
    """Reach every node at once; raise one error listing every node that failed."""
    from dyn.planner.nodes import LaunchNodes

    nodes = LaunchNodes(topology, accept_new_host_keys=options.accept_new_host_keys)
    async with nodes:
        results = await asyncio.gather(
            *(nodes.probe(n, local_cmd if topology.node(n).ssh.is_local else remote_cmd) for n in used),
            return_exceptions=True)
    failures = [(n, r) for n, r in zip(used, results) if isinstance(r, BaseException)]
    if failures:
        lines = "\n".join(f"  {n}: {r}" for n, r in failures)
        raise DeploymentError(f"{len(failures)} of {len(used)} nodes failed the pre-flight check; "
                              f"nothing was started:\n{lines}")


def _says_slurm(path: str) -> bool:
    from dyn.config.loader import parse_topology

    return parse_topology(_read(path, "topology"), path).launch == "slurm"


def _ensure_model(recipe) -> None:
    """The shipped recipes work out of the box: write the tiny checkpoint, or convert a GGUF source.

    Converting here (not in each worker) means the workers and the frontend of
    this machine start from the cache, and a missing model package fails
    before anything is launched, with the command that installs it.
    """
    if recipe.model.engine != "torch":
        return
    from dyn.engine.sources import resolve_checkpoint, source_file
    from dyn.errors import DynError

    try:
        if source_file(recipe.model.path) is not None:
            resolve_checkpoint(recipe.model.path, dtype=recipe.model.dtype)
            return
    except DynError as exc:
        raise DeploymentError(f"model.path {recipe.model.path!r}: {exc}") from None
    if Path(recipe.model.path).exists():
        return
    from dyn.engine.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(recipe.model.path, seed=0)


def _deadlines(overrides: dict[str, float]) -> Deadlines:
    try:
        return Deadlines.from_overrides(overrides)
    except ValueError as exc:
        raise DeploymentError(str(exc)) from None


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file: {exc.strerror}", path=str(path)) from None


def local_dyn_command() -> tuple[str, ...]:
    script = Path(sys.executable).with_name("dyn")
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (sys.executable, "-c", "from dyn.cli.main import main; main()")


def _tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return ""
