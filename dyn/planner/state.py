"""Deployment state on disk: what `dyn up` started, so nothing is ever forgotten.

Layout of one deployment under the state root (`$DYN_STATE_DIR`, default
`~/.local/state/dyn/`):

    <root>/<name>/deployment.json   written by `dyn up`: files, hash, options, daemon address
    <root>/<name>/keys.json         every CURVE key pair (0600)
    <root>/<name>/cli.keys.json     the CLI's ProcessKeys (0600)
    <root>/<name>/processes.json    written by the daemon: every process, host, pid, ports
    <root>/<name>/daemon.log        the daemon's log

Files are replaced atomically (write to a temp file, then rename), so a crash
or a dropped SSH session leaves the previous version, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Protocol, TypeVar

from dyn.errors import DeploymentError

STATE_DIR_ENV = "DYN_STATE_DIR"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def state_root() -> Path:
    """The state root: `$DYN_STATE_DIR`, else `~/.local/state/dyn`."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "dyn"


def check_name(name: str) -> str:
    """Deployment names become directory names and ids: keep them plain."""
    if not _NAME_RE.match(name):
        raise DeploymentError(f"bad deployment name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


def config_hash(topology_text: str, recipe_text: str, options: dict[str, Any]) -> str:
    """Identity of a deployment's inputs: an unchanged hash means `dyn up` has nothing to do."""
    h = hashlib.sha256()
    for part in (topology_text, recipe_text, json.dumps(options, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Deployment:
    """What `dyn up` decided; written once per bring-up, read by every command."""

    name: str
    topology_text: str
    recipe_text: str
    topology_source: str
    recipe_source: str
    config_hash: str
    head: str
    """Node hosting the daemon and the frontend."""
    dyn_command: tuple[str, ...]
    """argv prefix that runs dyn on the head node (local) ..."""
    remote_dyn_command: tuple[str, ...]
    """... and on the other nodes."""
    frontend_url: str
    created_at: float
    accept_new_host_keys: bool = False
    router_policy: str | None = None
    node_state_root: str | None = None
    """Run-dir root on every node; None: `$HOME/.local/state/dyn` there."""
    timeouts: dict[str, float] = field(default_factory=dict)
    """Overrides of the daemon's deadlines (tests and huge models)."""

    def to_json(self) -> str:
        data = asdict(self)
        data["dyn_command"] = list(self.dyn_command)
        data["remote_dyn_command"] = list(self.remote_dyn_command)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> "Deployment":
        data = _load_object(text, source)
        known = {f.name for f in fields(cls)}
        try:
            data = {k: v for k, v in data.items() if k in known}
            data["dyn_command"] = tuple(data["dyn_command"])
            data["remote_dyn_command"] = tuple(data["remote_dyn_command"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise DeploymentError(f"{source}: malformed deployment record ({exc})") from None


@dataclass(frozen=True)
class ProcessRecord:
    """One launched process as the daemon last saw it (persisted for adoption and `down --force`)."""

    id: str
    role: str
    node: str
    gpus: tuple[int, ...]
    pid: int | None
    run_dir: str
    log_path: str
    config_path: str
    state: str = "pending"
    addresses: dict[str, str] = field(default_factory=dict)
    num_restarts: int = 0


class _Launched(Protocol):
    node: str
    pid: int | None


L = TypeVar("L", bound=_Launched)


def one_per_process(launched: Iterable[L]) -> list[L]:
    """The first of each distinct (node, pid): mock workers hosted in one process share its pid, and
    that process is signalled and counted once."""
    seen: dict[tuple[str, int | None], L] = {}
    for item in launched:
        seen.setdefault((item.node, item.pid), item)
    return list(seen.values())


@dataclass(frozen=True)
class DaemonRecord:
    """Where the daemon runs; the CLI reads this to find it."""

    node: str
    pid: int
    address: str
    """Control ROUTER, e.g. tcp://127.0.0.1:41234."""
    started_at: float


@dataclass(frozen=True)
class Snapshot:
    """processes.json: the daemon's persisted view."""

    daemon: DaemonRecord | None
    phase: str
    """starting | running | failed | stopping | stopped"""
    processes: tuple[ProcessRecord, ...] = ()
    error: str = ""

    def to_json(self) -> str:
        return json.dumps({"daemon": asdict(self.daemon) if self.daemon else None, "phase": self.phase,
                           "processes": [_process_dict(p) for p in self.processes], "error": self.error},
                          indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> "Snapshot":
        data = _load_object(text, source)
        try:
            daemon = DaemonRecord(**data["daemon"]) if data.get("daemon") else None
            processes = tuple(ProcessRecord(**{**p, "gpus": tuple(p["gpus"])}) for p in data["processes"])
            return cls(daemon, data["phase"], processes, data.get("error", ""))
        except (KeyError, TypeError) as exc:
            raise DeploymentError(f"{source}: malformed process snapshot ({exc})") from None


def frontend_urls(processes: Iterable[Any], recorded_url: str) -> list[str]:
    """The URLs clients use: the ones the frontends among `processes` (the daemon's slots or its
    snapshot's records) serve on, one per node (a recipe's port 0 becomes the port each took);
    before any frontend reported, the deployment's recorded one."""
    urls = {p.addresses["http"] for p in processes if p.role == "frontend" and p.addresses.get("http")}
    return sorted(urls) or [recorded_url]


def client_urls(deployment: Deployment, snapshot: Snapshot | None) -> list[str]:
    """frontend_urls() from what is on disk (the CLI, without asking the daemon)."""
    return frontend_urls(snapshot.processes if snapshot else (), deployment.frontend_url)


class StateStore:
    """The files of one deployment under the state root."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = check_name(name)
        self.dir = (root or state_root()) / name

    deployment_path = property(lambda self: self.dir / "deployment.json")
    keys_path = property(lambda self: self.dir / "keys.json")
    cli_keys_path = property(lambda self: self.dir / "cli.keys.json")
    snapshot_path = property(lambda self: self.dir / "processes.json")
    daemon_log_path = property(lambda self: self.dir / "daemon.log")

    def exists(self) -> bool:
        return self.deployment_path.exists()

    def load_deployment(self) -> Deployment:
        try:
            text = self.deployment_path.read_text()
        except FileNotFoundError:
            raise DeploymentError(f"no deployment named {self.name!r} in {self.dir.parent} "
                                  "(see `dyn ls`)") from None
        return Deployment.from_json(text, str(self.deployment_path))

    def save_deployment(self, deployment: Deployment) -> None:
        atomic_write(self.deployment_path, deployment.to_json())

    def load_snapshot(self) -> Snapshot | None:
        try:
            return Snapshot.from_json(self.snapshot_path.read_text(), str(self.snapshot_path))
        except FileNotFoundError:
            return None

    def save_snapshot(self, snapshot: Snapshot) -> None:
        atomic_write(self.snapshot_path, snapshot.to_json())

    def remove(self) -> None:
        """Delete the deployment's state (after `dyn down`); the daemon's log stays for
        post-mortems (and is appended to by the next deployment of this name)."""
        if not self.dir.exists():
            return
        for path in sorted(self.dir.rglob("*"), reverse=True):
            if path.is_dir():
                path.rmdir()
            elif path != self.daemon_log_path:
                path.unlink(missing_ok=True)
        if not any(self.dir.iterdir()):
            self.dir.rmdir()


def list_deployments(root: Path | None = None) -> list[str]:
    """Names of deployments with a record under the state root, sorted."""
    base = root or state_root()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "deployment.json").is_file())


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace a file in one step; the directory is created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _process_dict(p: ProcessRecord) -> dict[str, Any]:
    data = asdict(p)
    data["gpus"] = list(p.gpus)
    return data


def _load_object(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DeploymentError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DeploymentError(f"{source}: expected a JSON object")
    return data
