"""Structured logs: one JSON object per line, tagged with deployment and process.

Every process of a deployment logs this way, so `dyn logs --request ID` can
follow one request across the frontend, prefill, shuttle and decode logs.
Pass `request_id=` through `extra` to tag a line with a request.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_ENCODER = json.JSONEncoder(default=str)
"""json.dumps(entry, default=str) without building an encoder per line."""


class JsonFormatter(logging.Formatter):
    def __init__(self, deployment: str, process_id: str) -> None:
        super().__init__()
        self._static = {"deployment": deployment, "process": process_id}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(time.time(), 6), "level": record.levelname.lower(), **self._static,
                 "logger": record.name, "msg": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


def setup_process_logging(deployment: str, process_id: str, *, level: int = logging.INFO) -> None:
    """Route the root logger to stderr as JSON lines (the launcher sends stderr to the log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(deployment, process_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The JSON lines never show the caller's file/line or thread: skip gathering them for each
    # record, as the logging HOWTO's "Optimization" section describes (a worker logs a line per
    # finished request). The pid stays: a library's own handler may print it with %(process)d
    # (vLLM's does; None there fails every one of its lines).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
