"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd of Debian's packages.

`start_slurm(tmpdir)` writes its own munge key (made here, never /etc/munge's),
its own slurm.conf (SLURM_CONF under tmpdir, free ports, state and spool dirs
under tmpdir, select/cons_tres, proctrack/linuxproc, task/none) and starts the
three daemons in the foreground of their own process groups. It waits until
`sinfo` shows the node idle, and on exit stops every daemon it started by pid
(never by name), so a system-wide cluster, if any, is never touched.

The node advertises four GPUs as gres backed by plain files (no device is
opened by task/none), so allocations carry SLURM_JOB_GPUS / SLURM_GPUS_ON_NODE
exactly as on a GPU node. `slurm_unavailable()` says why a test must skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sshd import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "srun", "salloc", "squeue", "scancel", "sinfo", "scontrol")
NUM_GPUS = 4
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SlurmCluster:
    conf_path: str
    nodes: tuple[str, ...]
    """NodeNames: this machine's short hostname, then <hostname>-2, ... (one slurmd each)."""
    root: str

    @property
    def node(self) -> str:
        return self.nodes[0]

    @property
    def env(self) -> dict[str, str]:
        """The environment every Slurm client command of the test needs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = self.conf_path
        return env

    def run(self, *argv: str, timeout_s: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout_s, **kwargs)


def slurm_unavailable() -> str | None:
    """Why a Slurm cluster cannot run here (None: it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.access(f"/usr/sbin/{b}", os.X_OK)]
    if missing:
        return (f"Slurm packages not installed ({', '.join(missing)} missing): "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch job steps"
    return None


@contextlib.contextmanager
def start_slurm(tmpdir: os.PathLike[str] | str, num_nodes: int = 1) -> Iterator[SlurmCluster]:
    """`num_nodes` Slurm nodes on this machine: one slurmd each, on its own port and spool dir."""
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    nodes = tuple([host] + [f"{host}-{i + 1}" for i in range(1, num_nodes)])
    procs: list[subprocess.Popen] = []
    try:
        munge_socket = _start_munge(root, procs)
        conf = _write_conf(root, nodes, munge_socket)
        cluster = SlurmCluster(str(conf), nodes, str(root))
        env = cluster.env
        procs.append(_spawn(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env))
        for node in nodes:
            procs.append(_spawn(["/usr/sbin/slurmd", "-D", "-f", str(conf), "-N", node],
                                root / f"slurmd-{node}.out", env))
        _wait_idle(cluster, procs)
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _start_munge(root: Path, procs: list[subprocess.Popen]) -> Path:
    mdir = root / "munge"
    mdir.mkdir(mode=0o700, exist_ok=True)
    key = mdir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    sock = mdir / "munge.sock"
    argv = ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"]
    procs.append(_spawn(argv, mdir / "munged.out", dict(os.environ)))
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not sock.exists():
        _check_running(procs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"munged did not create {sock}: {(mdir / 'munged.out').read_text()[-500:]}")
        time.sleep(0.05)
    return sock


def _write_conf(root: Path, nodes: tuple[str, ...], munge_socket: Path) -> Path:
    (root / "ctld").mkdir(exist_ok=True)
    gres_lines, node_lines = [], []
    for node in nodes:
        (root / f"spool-{node}").mkdir(exist_ok=True)
        for i in range(NUM_GPUS):
            (root / f"{node}-gpu{i}").touch()
        gres_lines.append(f"NodeName={node} Name=gpu File={root}/{node}-gpu[0-{NUM_GPUS - 1}]\n")
        node_lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={nodes[0]} Port={free_port()} "
                          f"CPUs={os.cpu_count() or 1} Gres=gpu:{NUM_GPUS} State=UNKNOWN")
    (root / "gres.conf").write_text("".join(gres_lines))
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        f"ClusterName=dyntest{secrets.token_hex(3)}",
        f"SlurmctldHost={nodes[0]}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'ctld'}",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "ReturnToService=2",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=2",
        "GresTypes=gpu",
        *node_lines,
        f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        "",
    ]))
    return conf


def _spawn(argv: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = open(out, "ab")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    finally:
        handle.close()


def _wait_idle(cluster: SlurmCluster, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        _check_running(procs)
        result = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", timeout_s=10)
        last = (result.stdout + result.stderr).strip()
        states = [line.split()[-1] for line in last.splitlines() if line.strip()]
        if result.returncode == 0 and len(states) == len(cluster.nodes) and set(states) == {"idle"}:
            return
        time.sleep(0.2)
    logs = "".join(_tail(Path(cluster.root) / f) for f in ("slurmctld.log", *(f"slurmd-{n}.log" for n in cluster.nodes)))
    raise RuntimeError(f"the test Slurm node did not become idle in {_START_TIMEOUT_S:.0f} s "
                       f"(sinfo: {last!r}):\n{logs}")


def _check_running(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} during start-up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(path: Path, num_chars: int = 1500) -> str:
    try:
        return f"--- {path.name}\n{path.read_text(errors='replace')[-num_chars:]}\n"
    except OSError:
        return ""
