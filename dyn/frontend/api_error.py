"""The HTTP-level error type every frontend module raises (rendered as OpenAI's error object)."""

from __future__ import annotations

from typing import Any

from dyn.errors import DynError


class ApiError(DynError):
    """An HTTP-level failure rendered as OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 retry_after_s: float | None = None, close_connection: bool = False) -> None:
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type
        self.retry_after_s = retry_after_s
        self.close_connection = close_connection
        """Close the connection after the response: the client's retry must reach another server."""
        super().__init__(f"{param}: {message}" if param else message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
