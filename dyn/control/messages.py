"""Control-plane messages: daemon (ROUTER) <-> workers, frontend and the CLI (DEALER)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from dyn.control.codec import Codec, Message

ProcessState = Literal["starting", "loading", "ready", "draining", "stopping", "failed"]


@dataclass(slots=True)
class Register(Message):
    """First message of every process; the daemon answers RegisterAck."""

    TYPE: ClassVar[str] = "register"
    process_id: str
    role: str
    """prefill | decode | both | frontend"""
    node: str
    pid: int
    version: str
    addresses: dict[str, str] = field(default_factory=dict)
    """Endpoints it serves: request, kv_events, shuttle, metrics, http."""
    gpus: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RegisterAck(Message):
    TYPE: ClassVar[str] = "register_ack"
    ok: bool
    reason: str = ""
    heartbeat_interval_s: float = 1.0


@dataclass(slots=True)
class Heartbeat(Message):
    """Sent every interval and on every state change; carries the metrics the daemon shows."""

    TYPE: ClassVar[str] = "heartbeat"
    process_id: str
    state: ProcessState
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form telemetry (telemetry strings, shuttle paths, errors)."""


@dataclass(slots=True)
class Command(Message):
    """Daemon -> process: drain, stop, set_role, authorize, ..."""

    TYPE: ClassVar[str] = "command"
    action: Literal["drain", "stop", "set_role", "authorize", "update_workers"]
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CliRequest(Message):
    """CLI -> daemon: status, down, ..."""

    TYPE: ClassVar[str] = "cli_request"
    action: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CliReply(Message):
    TYPE: ClassVar[str] = "cli_reply"
    ok: bool
    payload: dict[str, Any] = field(default_factory=dict)
    error: str = ""


CONTROL_CODEC = Codec([Register, RegisterAck, Heartbeat, Command, CliRequest, CliReply])
