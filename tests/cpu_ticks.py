"""CPU time of processes and threads, from /proc, for tests that check nothing spins while idle."""

from __future__ import annotations

import os


def thread_ticks(pid: int | str = "self") -> dict[str, int]:
    """CPU clock ticks (user + system) of each thread of process `pid`."""
    ticks = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process is gone
        return ticks
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


TICKS_PER_S = os.sysconf("SC_CLK_TCK")
