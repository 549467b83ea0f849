"""Structured logs: one JSON object per line, tagged with deployment and process.

Every process of a deployment logs this way, so `dyn logs --request ID` can
follow one request across the frontend, prefill, shuttle and decode logs.
Pass `request_id=` through `extra` to tag a line with a request.
"""

from __future__ import annotations

import contextvars
import faulthandler
import json
import logging
import signal
import sys
import time
from typing import TextIO

_ENCODER = json.JSONEncoder(default=str)
"""json.dumps(entry, default=str) without building an encoder per line."""

STACK_DUMP_SIGNAL = signal.SIGUSR1
"""Asks a dyn process to write every thread's stack to its log (dyn.planner.stack_dump)."""

_HOSTED = contextvars.ContextVar[str | None]("dyn_hosted_process", default=None)
"""The worker a line comes from, in a process hosting several (dyn.worker.host): set in the
context each hosted worker runs in, so its tasks, callbacks and threads inherit it."""


def hosted_context(process_id: str) -> contextvars.Context:
    """A copy of the current context whose log lines belong to `process_id` (its file, its name)."""
    context = contextvars.copy_context()
    context.run(_HOSTED.set, process_id)
    return context


class JsonFormatter(logging.Formatter):
    def __init__(self, deployment: str, process_id: str) -> None:
        super().__init__()
        self._deployment = deployment
        self._process = process_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(time.time(), 6), "level": record.levelname.lower(), "deployment": self._deployment,
                 "process": _HOSTED.get() or self._process, "logger": record.name, "msg": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class _HostedStreams(logging.StreamHandler):
    """stderr, except for the lines of a hosted worker that has a log file of its own."""

    def __init__(self, files: dict[str, TextIO]) -> None:
        super().__init__(sys.stderr)
        self._files = files

    def emit(self, record: logging.LogRecord) -> None:
        stream = self._files.get(_HOSTED.get() or "")
        if stream is None:
            super().emit(record)
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_process_logging(deployment: str, process_id: str, *, level: int = logging.INFO,
                          hosted_logs: dict[str, str] | None = None) -> None:
    """Route the root logger to stderr as JSON lines (the launcher sends stderr to the log file).
    `hosted_logs`: {process id: log path} of the other workers this process hosts; their lines
    (those logged in their `hosted_context`) go to their own files, where `dyn logs` and the
    daemon look for them."""
    handler = _HostedStreams({pid: open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)
                              for pid, path in (hosted_logs or {}).items()})
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


def dump_stacks_on_signal() -> None:
    """On STACK_DUMP_SIGNAL, write every thread's stack to stderr (the log file). faulthandler does it
    from the signal handler in C, so a process stuck in a C call, or holding the GIL in a loop, still
    answers; the daemon asks before it kills a process that stopped making progress."""
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True)
