"""The daemon's hands on the nodes: start, probe and signal processes through dyn.launch.

`Nodes` is the narrow interface the daemon needs; `LaunchNodes` implements it
over the launcher's RunnerPool (SSH, or a local subprocess for `address:
local`). Tests of the daemon's logic inject a fake with the same methods.
Batch probes (one shell command per node for all its pids) keep a 72-worker
rack to 18 SSH round trips per liveness sweep.
"""

from __future__ import annotations

import os
import secrets
import shlex

from dyn import __version__
from dyn.errors import LaunchError
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dyn.config.topology import Topology


class Nodes(Protocol):
    async def __aenter__(self) -> "Nodes": ...

    async def __aexit__(self, *exc) -> None: ...

    async def probe(self, node: str, dyn_command: tuple[str, ...]) -> None:
        """Connect and check that `dyn_command` runs there; raise LaunchError naming the node."""
        ...

    async def run_root(self, node: str) -> str:
        """Absolute directory under which this deployment's run dirs live on `node`."""
        ...

    async def put_files(self, node: str, files: dict[str, str]) -> None:
        """Write 0600 files on `node` in one command (parent directories are created 0700)."""
        ...

    async def start(self, node: str, name: str, argv: tuple[str, ...], log_path: str,
                    env: dict[str, str]) -> int:
        """Start a detached process in its own process group; return its pid."""
        ...

    async def alive(self, node: str, pids: list[int]) -> set[int]:
        """The subset of `pids` still running on `node`."""
        ...

    async def owned(self, node: str, pids: dict[int, str]) -> set[int]:
        """Pids still running whose command line contains the given marker (guards against pid reuse)."""
        ...

    async def kill(self, node: str, pid: int, sig: int) -> None:
        """Signal a process's group (missing processes are not an error)."""
        ...

    async def remove(self, node: str, paths: list[str]) -> None:
        """Delete files on `node` (missing ones are fine)."""
        ...

    async def size(self, node: str, path: str) -> int:
        """Size of a file in bytes (0 when missing)."""
        ...

    async def read_from(self, node: str, path: str, offset: int) -> str:
        """A file's bytes from `offset` on (for `dyn logs -f`)."""
        ...

    async def tail(self, node: str, path: str, num_lines: int = 20) -> str:
        """Last lines of a file on `node` ("" when unreadable)."""
        ...


class LaunchNodes:
    """`Nodes` over dyn.launch's RunnerPool."""

    def __init__(self, topology: "Topology", *, accept_new_host_keys: bool = False,
                 node_state_root: str | None = None, deployment: str = "",
                 max_concurrency: int = 32) -> None:
        from dyn.launch.ssh import SshOptions

        self._topology = topology
        self._options = SshOptions(accept_new_host_keys=accept_new_host_keys)
        self._node_state_root = node_state_root
        self._deployment = deployment
        self._max_concurrency = max_concurrency
        self._pool = None
        self._roots: dict[str, str] = {}

    async def __aenter__(self) -> "LaunchNodes":
        from dyn.launch.pool import RunnerPool
        from dyn.launch.ssh import connect

        self._pool = RunnerPool(list(self._topology.nodes), self._options, self._max_concurrency,
                                connector=self._connector() or connect)
        await self._pool.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        if self._pool is not None:
            await self._pool.__aexit__(*exc)
            self._pool = None

    async def _runner(self, node: str):
        return await self._pool.get(node)

    async def _pid_runner(self, node: str):
        """Where the node's process handles (pids) live: the node itself over SSH,
        the head for Slurm steps (their srun clients)."""
        runner = await self._pool.get(node)
        return runner.process_runner() if hasattr(runner, "process_runner") else runner

    def _connector(self):
        if self._topology.launch != "slurm":
            return None
        from dyn.launch.slurm import SlurmConnector

        if not self._topology.slurm_job:
            raise LaunchError("the topology says `launch: slurm` but names no allocation (slurm_job): "
                              "run `dyn up --slurm` inside salloc/sbatch", node=self._topology.head)
        return SlurmConnector(self._topology.slurm_job, deployment=self._deployment)

    async def end_leftover_steps(self) -> list[str]:
        """Slurm: cancel any step of this deployment still running (a step whose srun client
        was killed outlives it); the step ids cancelled. Nothing to do over SSH."""
        if self._topology.launch != "slurm" or not self._topology.slurm_job:
            return []
        from dyn.launch.slurm import cancel_steps, step_prefix

        runner = await self._pid_runner(self._topology.head)
        return await cancel_steps(runner, self._topology.slurm_job, step_prefix(self._deployment))

    async def launcher_gone(self) -> str | None:
        """Why no process can run any more (the Slurm allocation ended), else None."""
        if self._topology.launch != "slurm" or not self._topology.slurm_job:
            return None
        from dyn.launch.slurm import job_state

        runner = await self._pid_runner(self._topology.head)
        state = await job_state(runner, self._topology.slurm_job)
        if state in (None, "COMPLETED", "COMPLETING", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                     "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"):
            return f"Slurm allocation {self._topology.slurm_job} ended ({state or 'gone from squeue'})"
        return None
    async def probe(self, node: str, dyn_command: tuple[str, ...]) -> None:
        from dyn.launch.preflight import preflight

        runner = await self._runner(node)
        await preflight(runner, dyn_command=tuple(dyn_command), expected_version=__version__)

    async def run_root(self, node: str) -> str:
        if node not in self._roots:
            root = self._node_state_root
            if root is None:
                result = await (await self._runner(node)).run(("sh", "-c", 'printf %s "$HOME/.local/state/dyn"'))
                root = _stdout(result).strip()
            self._roots[node] = f"{root.rstrip('/')}/{self._deployment}/run"
        return self._roots[node]

    async def put_files(self, node: str, files: dict[str, str]) -> None:
        if not files:
            return
        # The script travels on stdin: dozens of process configs on one node overflow one argument
        # (Linux caps a single argv string at 128 KiB).
        result = await (await self._runner(node)).run(("sh", "-s"), timeout_s=60, input=put_files_script(files))
        if not getattr(result, "ok", True):
            raise LaunchError(f"writing {len(files)} files failed (exit {result.exit_status}): "
                              f"{result.stderr.strip()[:300]}", node=node)

    async def start(self, node: str, name: str, argv: tuple[str, ...], log_path: str,
                    env: dict[str, str]) -> int:
        from dyn.launch.runner import ProcessSpec

        spec = ProcessSpec(name=name, argv=tuple(argv), log_path=log_path, env=tuple(sorted(env.items())))
        launched = await (await self._runner(node)).start_detached(spec)
        return int(launched.pid)

    async def alive(self, node: str, pids: list[int]) -> set[int]:
        if not pids:
            return set()
        result = await (await self._pid_runner(node)).run(("sh", "-c", alive_script(pids)))
        return {int(tok) for tok in _stdout(result).split() if tok.isdigit()}

    async def owned(self, node: str, pids: dict[int, str]) -> set[int]:
        if not pids:
            return set()
        result = await (await self._pid_runner(node)).run(("sh", "-c", owned_script(pids)))
        return {int(tok) for tok in _stdout(result).split() if tok.isdigit()}

    async def kill(self, node: str, pid: int, sig: int) -> None:
        await (await self._runner(node)).signal(pid, sig, group=True)

    async def remove(self, node: str, paths: list[str]) -> None:
        await (await self._runner(node)).run(("rm", "-f", "--", *paths))

    async def size(self, node: str, path: str) -> int:
        result = await (await self._runner(node)).run(
            ("sh", "-c", f"wc -c < {shlex.quote(path)} 2>/dev/null || echo 0"))
        text = _stdout(result).strip()
        return int(text) if text.isdigit() else 0

    async def read_from(self, node: str, path: str, offset: int) -> str:
        result = await (await self._runner(node)).run(("tail", "-c", f"+{int(offset) + 1}", "--", path))
        return _stdout(result)

    async def tail(self, node: str, path: str, num_lines: int = 20) -> str:
        try:
            return await (await self._runner(node)).read_tail(path, num_lines)
        except Exception:  # a log we cannot read must not hide the failure we are reporting
            result = await (await self._runner(node)).run(
                ("sh", "-c", f"tail -n {int(num_lines)} -- {shlex.quote(path)} 2>/dev/null; true"))
            return _stdout(result)


def alive_script(pids: list[int]) -> str:
    """Shell that prints the pids still running; zombies count as dead (an init that
    does not reap, as in some containers, would otherwise keep them "alive")."""
    listed = " ".join(str(int(p)) for p in pids)
    # Shell builtins only (no sed/cut per pid): one `sh` per node per sweep.
    return (f"for p in {listed}; do if [ -d /proc/self ]; then "
            "read -r s < /proc/$p/stat 2>/dev/null || continue; s=${s##*) }; "
            "case $s in Z*|X*) ;; *) echo $p;; esac; "
            "elif kill -0 $p 2>/dev/null; then echo $p; fi; done; true")


def owned_script(pids: dict[int, str]) -> str:
    """Shell that prints each pid that runs and whose command line contains its marker.

    A process that is exiting (PF_EXITING in its stat flags) but not yet a zombie has an empty
    command line once its memory is released, which takes seconds for a worker holding GiBs of
    weights: it still counts as running, or `dyn down` would return while it holds memory and ports."""
    checks = []
    for pid, marker in pids.items():
        checks.append(f"p={int(pid)}; if [ -r /proc/$p/cmdline ]; then "
                      "c=$(tr '\\0' ' ' </proc/$p/cmdline); s=$(sed 's/.*) //' /proc/$p/stat); "
                      "set -- $s; if [ $# -ge 7 ] && [ \"$1\" != Z ] && [ \"$1\" != X ]; then "
                      "if [ -z \"$c\" ]; then [ $(($7 & 4)) -ne 0 ] && echo $p; "
                      f"elif printf '%s' \"$c\" | grep -qF -- {shlex.quote(marker)}; then echo $p; fi; fi; fi")
    return "\n".join(checks) + "\ntrue"


def put_files_script(files: dict[str, str]) -> str:
    """A POSIX sh script writing each file through a quoted here-document (no expansion),
    umask 077, each file renamed into place so a reader never sees half of one."""
    lines = ["set -e", "umask 077"]
    for path, text in files.items():
        delimiter = "DYN_EOF_" + secrets.token_hex(8)
        assert delimiter not in text
        tmp = f"{path}.tmp.$$"
        lines.append(f"mkdir -p -- {shlex.quote(os.path.dirname(path) or '.')}")
        lines.append(f"cat > {shlex.quote(tmp)} <<'{delimiter}'\n{text}\n{delimiter}")
        lines.append(f"mv -f -- {shlex.quote(tmp)} {shlex.quote(path)}")
    return "\n".join(lines) + "\n"


def _stdout(result) -> str:
    out = getattr(result, "stdout", result)
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return out or ""
