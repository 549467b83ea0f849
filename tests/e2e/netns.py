"""Hosts in Linux network namespaces, for partition tests: each has its own veth and sshd.

    root namespace (head: daemon, frontend)         namespace dynNNNN-1        namespace dynNNNN-2
    bridge dbNNNN  10.R.S.1/24 --- vhNNNN-1 ====== eth0 10.R.S.2             eth0 10.R.S.3
                               \\-- vhNNNN-2 ===================================/
                                                    sshd :2222                 sshd :2222

`cut(i)` takes host i's veth down (its processes keep running, unreachable);
`heal(i)` brings it back. Everything (sshd by pid, namespaces, links) is removed
in `close`, even after a failure half way. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import getpass
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sshd import SSHD, keygen

PORT = 2222


def _ip(*args: str, ns: str | None = None) -> None:
    argv = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not os.access(SSHD, os.X_OK):
        return f"needs {SSHD}"
    probe = f"dynprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip netns is not permitted here: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@dataclass
class NsHost:
    name: str
    namespace: str
    address: str
    host_veth: str
    client_key: str
    known_hosts_line: str = ""
    sshd: subprocess.Popen | None = None
    user: str = field(default_factory=getpass.getuser)
    port: int = PORT


class NetnsLab:
    def __init__(self, root: Path, num_hosts: int) -> None:
        self.root = root
        self.tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.head_address = f"{self.subnet}.1"
        self.bridge = f"db{self.tag}"
        self.hosts: list[NsHost] = []
        self._num_hosts = num_hosts

    def __enter__(self) -> "NetnsLab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cut(self, index: int) -> None:
        _ip("link", "set", self.hosts[index].host_veth, "down")

    def heal(self, index: int) -> None:
        _ip("link", "set", self.hosts[index].host_veth, "up")

    def write_known_hosts(self) -> str:
        path = self.root / "known_hosts"
        path.write_text("".join(h.known_hosts_line + "\n" for h in self.hosts))
        return str(path)

    def close(self) -> None:
        for host in self.hosts:
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.send_signal(signal.SIGTERM)
                try:
                    host.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait(timeout=5)
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.host_veth], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)

    def _build(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        client_key = str(keygen(self.root / "id_ed25519"))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.head_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(1, self._num_hosts + 1):
            host = NsHost(f"tray{i}", f"dyn{self.tag}-{i}", f"{self.subnet}.{i + 1}", f"vh{self.tag}-{i}",
                          client_key)
            self.hosts.append(host)
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.host_veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            _ip("link", "set", host.host_veth, "master", self.bridge)
            _ip("link", "set", host.host_veth, "up")
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", ns=host.namespace)
            _ip("link", "set", "eth0", "up", ns=host.namespace)
            _ip("link", "set", "lo", "up", ns=host.namespace)
            self._start_sshd(host)

    def _start_sshd(self, host: NsHost) -> None:
        d = self.root / host.name
        d.mkdir(exist_ok=True)
        host_key = keygen(d / "ssh_host_ed25519_key", "dyn-netns-host")
        authorized = d / "authorized_keys"
        authorized.write_text(Path(f"{host.client_key}.pub").read_text())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        argv = ["ip", "netns", "exec", host.namespace, SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(PORT),
                "-h", str(host_key), "-o", f"ListenAddress={host.address}",
                "-o", f"AuthorizedKeysFile={authorized}", "-o", f"PidFile={d / 'sshd.pid'}",
                "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "UsePAM=no",
                "-o", "PermitRootLogin=prohibit-password", "-o", "KbdInteractiveAuthentication=no"]
        with open(d / "sshd.log", "ab") as log:
            host.sshd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        host.known_hosts_line = f"[{host.address}]:{PORT} {pub}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if host.sshd.poll() is not None:
                raise OSError(f"sshd in {host.namespace} exited: {(d / 'sshd.log').read_text()[-500:]}")
            try:
                with socket.create_connection((host.address, PORT), timeout=1) as s:
                    if s.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise OSError(f"sshd in {host.namespace} did not answer on {host.address}:{PORT}")
