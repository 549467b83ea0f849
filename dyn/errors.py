"""The exception hierarchy: every error an operator can see is a DynError.

Subclasses carry fields (file, line, node, ...) so callers can render or test
them without parsing strings. Library code raises; only the CLI prints.
"""

from __future__ import annotations


class DynError(Exception):
    """Base class. `str(err)` is a complete, operator-facing message."""

    exit_code: int = 1


class ConfigError(DynError):
    """A topology or recipe file is wrong.

    `path` and `line` locate the problem (line is 1-based, None when the
    whole file is at fault); `field` is the dotted key path.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.path:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}{what}" + (f" ({self.hint})" if self.hint else "")


class PlacementError(DynError):
    """A recipe does not fit the topology; the message says by how much."""

    exit_code = 2


class EngineError(DynError):
    """The engine cannot load or run (bad checkpoint, unknown architecture)."""


class RequestError(DynError):
    """One request is invalid; the engine keeps serving the others.

    `field` names the offending input (e.g. "max_tokens") for API errors.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class ProtocolError(DynError):
    """A wire message failed validation (version, type, fields, size)."""


class LaunchError(DynError):
    """A process could not be started or did not come up on a node."""

    def __init__(self, message: str, *, node: str | None = None, process: str | None = None,
                 log_tail: str | None = None) -> None:
        self.node = node
        self.process = process
        self.log_tail = log_tail
        parts = [p for p in (node, process) if p]
        prefix = f"[{' / '.join(parts)}] " if parts else ""
        text = prefix + message
        if log_tail:
            text += "\n--- last log lines ---\n" + log_tail.rstrip()
        super().__init__(text)


class ShuttleError(DynError):
    """A KV transfer failed (broken stream, hash mismatch, timeout)."""


class DeploymentError(DynError):
    """A deployment is missing, already running, or its daemon is unreachable."""
