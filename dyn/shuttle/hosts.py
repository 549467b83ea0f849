"""Which host a process runs on, for transports that need one (shm, cuda_ipc)."""

from __future__ import annotations

import socket


def local_host_id() -> str:
    """Hostname plus kernel boot id: two containers or a reboot never look like one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"
