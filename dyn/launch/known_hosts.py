"""known_hosts handling: look a host up, and record a new key (accept-new).

Host keys are always verified. With `--accept-new-host-keys` a host that has
no line at all is trusted on first use and written to the file; a host whose
line carries a different key is never accepted (OpenSSH `accept-new`).
"""

from __future__ import annotations

import ipaddress
import os

import asyncssh

from dyn.config.topology import SshTarget

DEFAULT_PORT = 22


def known_hosts_path(target: SshTarget) -> str:
    """The file used for `target`: its own `known_hosts`, else ~/.ssh/known_hosts."""
    return os.path.expanduser(target.known_hosts or "~/.ssh/known_hosts")


def load(path: str) -> asyncssh.SSHKnownHosts:
    """Parse a known_hosts file; a missing file is an empty one."""
    if not os.path.exists(path):
        return asyncssh.import_known_hosts("")
    return asyncssh.read_known_hosts(path)


def has_entry(known: asyncssh.SSHKnownHosts, host: str, port: int) -> bool:
    """Whether any line (trusted, CA or revoked) names this host and port."""
    addr = host if _is_ip(host) else ""
    matches = known.match(host, addr, None if port == DEFAULT_PORT else port)
    return any(matches)


def host_pattern(host: str, port: int) -> str:
    """known_hosts spelling of a host: `host`, or `[host]:port` off port 22."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def record(path: str, host: str, port: int, key: asyncssh.SSHKey) -> str:
    """Append a line for `host:port` with `key` (file 0600, dir 0700); returns the line.

    A line already present is not written twice (several nodes may share a host).
    """
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    line = f"{host_pattern(host, port)} {algorithm} {blob}"
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if any(existing.strip() == line for existing in f):
                return line
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    needs_newline = os.path.exists(path) and os.path.getsize(path) > 0 and not _ends_with_newline(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(("\n" if needs_newline else "") + line + "\n")
    return line


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
