"""Where a hung process was: the part of a faulthandler dump that a failure report shows.

Before killing a process that stopped making progress (no registration, not
ready in time, no heartbeats), the daemon sends it `dyn.logs.STACK_DUMP_SIGNAL`;
faulthandler writes every thread's stack to its log. A dyn worker's event loop
sits in the main thread and its engine works in others (a vLLM worker has a
dozen), most of them waiting for work. The report keeps the log lines before
the dump and the innermost frames of the threads that were stuck in
something: dyn's own first (the engine load or step that did not finish).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_THREAD_HEADER = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ ")
_DUMP_LINE = re.compile(r"^(  File |  <no Python frame>|  \.\.\.|$)")
_WAITING = re.compile(r'/(threading\.py", line \d+ in (wait|acquire)|queue\.py", line \d+ in get'
                      r'|selectors\.py", line \d+ in select|zmq/sugar/poll\.py", line \d+ in poll)$')
"""Frames that block: what a thread was waiting in, not what it was doing."""
_WORK_LOOP = re.compile(r'/(asyncio/(base_events|runners)\.py|threading\.py|concurrent/futures/thread\.py)", ')
"""A thread's own loop: waiting right there means waiting for work (an event loop with nothing to
do, uvloop's in C under asyncio.run; a pool thread with no task; a thread's target that only waits)."""
_DYN_FRAME = re.compile(r'/dyn/[^"]+\.py", ')


@dataclass
class _Thread:
    header: str
    frames: list[str] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        doing = [f for f in self.frames if not _WAITING.search(f.rstrip())]
        return not doing or bool(_WORK_LOOP.search(doing[0]))

    @property
    def in_dyn(self) -> bool:
        return any(_DYN_FRAME.search(f) for f in self.frames)


def hung_stack_report(log_tail: str, *, context_lines: int = 8, frames: int = 12) -> str:
    """The log lines before the last stack dump in `log_tail`, then the innermost `frames` frames of
    the threads stuck in dyn's code (none: of every thread stuck in something; none either: of the
    thread that took the signal, else the last listed, the main thread). Without a dump (it could
    not write one), the last lines of the log."""
    lines = log_tail.splitlines()
    headers = [i for i, line in enumerate(lines) if _THREAD_HEADER.match(line)]
    if not headers:
        return "\n".join(lines[-(context_lines + frames):])
    start = headers[-1]
    while start > 0 and (_THREAD_HEADER.match(lines[start - 1]) or _DUMP_LINE.match(lines[start - 1])):
        start -= 1
    threads: list[_Thread] = []
    for line in lines[start:]:
        if _THREAD_HEADER.match(line):
            threads.append(_Thread(line))
        elif threads and line.startswith("  "):
            threads[-1].frames.append(line)
        elif threads and line.strip():
            break  # the log goes on after the dump
    stuck = [t for t in threads if not t.idle]
    shown = ([t for t in stuck if t.in_dyn] or stuck
             or [next((t for t in threads if t.header.startswith("Current thread")), threads[-1])])
    report = [line for line in lines[max(0, start - context_lines):start] if line.strip()]
    for thread in shown:
        report += [thread.header, *thread.frames[:frames]]
        if len(thread.frames) > frames:
            report.append(f"  ... {len(thread.frames) - frames} outer frames")
    if len(threads) > len(shown):
        report.append(f"({len(threads) - len(shown)} other thread(s) not shown; "
                      f"{len(threads) - len(stuck)} of {len(threads)} were waiting for work)")
    return "\n".join(report)
