"""ProcessConfig: what the daemon hands each process it launches (one JSON file).

The daemon writes it to the process's node next to its key file; `dyn worker
--config F` and `dyn frontend --config F` read it. Recipe and topology travel
as text so a node needs no copy of the operator's files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyn.errors import ConfigError


@dataclass(frozen=True)
class ProcessConfig:
    deployment: str
    process_id: str
    """e.g. "decode-1", "frontend"."""
    role: str
    """prefill | decode | both | frontend"""
    node: str
    daemon_address: str
    """Control-plane ROUTER of the daemon, e.g. tcp://10.0.0.11:41000."""
    recipe_text: str
    topology_text: str
    recipe_source: str = "<recipe>"
    topology_source: str = "<topology>"
    keys_path: str | None = None
    """ProcessKeys JSON (0600); None when the recipe disables CURVE."""
    bind_host: str = "127.0.0.1"
    gpus: tuple[int, ...] = ()
    cpu_threads: int | None = None
    run_dir: str = "."
    """Per-deployment directory on the node (logs, keys, tier files)."""
    log_path: str = ""
    """The file the launcher sends this process's output to; a worker hosted by another's process
    (model.mock_workers_per_process) writes its lines there itself."""
    heartbeat_interval_s: float = 1.0
    daemon_grace_s: float = 30.0
    """Exit on our own when the daemon has been silent this long."""
    drain_grace_s: float = 10.0
    """On stop (SIGTERM), how long requests in flight may finish; the rest are then failed as
    retryable (the frontend moves them). The daemon sets half its stop deadline, so a process
    says so itself before the daemon kills it."""
    extra: dict[str, str] = field(default_factory=dict)
    """Overrides (e.g. router policy from `dyn up --router`)."""

    def to_json(self) -> str:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<process config>") -> "ProcessConfig":
        try:
            data = json.loads(text)
            data["gpus"] = tuple(data.get("gpus", ()))
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"malformed process config ({exc})", path=source) from None

    @classmethod
    def load(cls, path: str | Path) -> "ProcessConfig":
        p = Path(path)
        try:
            return cls.from_json(p.read_text(), str(p))
        except OSError as exc:
            raise ConfigError(f"cannot read process config: {exc.strerror}", path=str(p)) from None
