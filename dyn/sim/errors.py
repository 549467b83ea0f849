"""Errors of the simulator: bad options or inputs, named by field."""

from __future__ import annotations

from dyn.errors import DynError


class SimError(DynError):
    """The simulation cannot run as asked; `field` names the option or recipe key at fault."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
