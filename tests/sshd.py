"""Real OpenSSH servers on loopback for tests (no mocks).

`start_sshd(tmpdir)` generates an ed25519 host key and client key, an
authorized_keys file, starts `/usr/sbin/sshd -D` on a free loopback port,
waits until it speaks SSH, and always kills it by pid on exit. Several hosts
are several ports on 127.0.0.1, or distinct 127.0.0.x addresses (Linux routes
all of 127/8 to lo). Tests skip when sshd or ssh-keygen is missing.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SshdHandle:
    """One running test sshd: where it listens and the keys to reach it."""

    host: str
    port: int
    host_key_pub: str
    """The host public key line, "ssh-ed25519 AAAA..."."""
    known_hosts_line: str
    """A known_hosts line trusting this server, "[host]:port ssh-ed25519 AAAA..."."""
    client_key_path: str
    """Private key authorized to log in as `user`."""
    pid: int
    user: str
    log_path: str

    def node_ssh(self, known_hosts: str | None = None, identity_file: str | None = None):
        """An SshTarget for this server (identity defaults to the authorized key)."""
        from dyn.config.topology import SshTarget

        return SshTarget(address=self.host, port=self.port, user=self.user,
                         identity_file=identity_file or self.client_key_path, known_hosts=known_hosts)


def sshd_available() -> bool:
    return os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen") is not None


def keygen(path: Path, comment: str = "dyn-test") -> Path:
    """An unencrypted ed25519 key pair at `path` / `path.pub`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_sshd(tmpdir: os.PathLike[str] | str, host: str = "127.0.0.1",
               client_key: Path | None = None) -> Iterator[SshdHandle]:
    """Run one sshd for the duration of the block; `client_key` may be shared."""
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    host_key = keygen(root / "ssh_host_ed25519_key", "dyn-test-host")
    client_key = client_key or keygen(root / "id_ed25519")
    authorized = root / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc, port, log_path = _spawn(root, host, host_key, authorized)
    try:
        host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        yield SshdHandle(host=host, port=port, host_key_pub=host_pub,
                         known_hosts_line=f"[{host}]:{port} {host_pub}", client_key_path=str(client_key),
                         pid=proc.pid, user=getpass.getuser(), log_path=str(log_path))
    finally:
        _stop(proc)


@contextlib.contextmanager
def start_sshd_hosts(tmpdir: os.PathLike[str] | str, num_hosts: int,
                     distinct_addresses: bool = False) -> Iterator[list[SshdHandle]]:
    """`num_hosts` servers sharing one client key; 127.0.0.(i+1) when distinct."""
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    client_key = keygen(root / "id_ed25519")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(start_sshd(root / f"host{i}", f"127.0.0.{i + 1}"
                                                  if distinct_addresses else "127.0.0.1", client_key))
                   for i in range(num_hosts)]
        yield handles


def write_known_hosts(path: os.PathLike[str] | str, handles: Sequence[SshdHandle]) -> str:
    """A known_hosts file trusting exactly `handles`; returns its path."""
    Path(path).write_text("".join(h.known_hosts_line + "\n" for h in handles))
    return str(path)


def _spawn(root: Path, host: str, host_key: Path, authorized: Path
           ) -> tuple[subprocess.Popen[bytes], int, Path]:
    log_path = root / "sshd.log"
    last_error = ""
    for _ in range(3):  # a free port can be taken between probing and binding
        port = free_port(host)
        argv = [SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-h", str(host_key),
                "-o", f"ListenAddress={host}", "-o", f"AuthorizedKeysFile={authorized}",
                "-o", f"PidFile={root / 'sshd.pid'}", "-o", "StrictModes=no",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                "-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no",
                # lets a test give one host its own environment (authorized_keys environment="...")
                "-o", "PermitUserEnvironment=yes", "-o", "LogLevel=VERBOSE"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if _wait_ready(proc, host, port):
            return proc, port, log_path
        _stop(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"test sshd did not start on {host}:\n{last_error}")


def _wait_ready(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
