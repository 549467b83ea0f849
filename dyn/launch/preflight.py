"""Preflight: check a node can run this deployment before starting anything.

Each failure names the node and says what to install or change, so an
operator fixing a 72-node rack sees every bad node in one `dyn up`.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

from dyn.errors import LaunchError
from dyn.launch.runner import Runner

MIN_PYTHON = (3, 11)
"""Matches `requires-python` in pyproject.toml."""

_VERSION_RE = re.compile(r"\bdyn\s+(\S+)")
_PY_VERSION = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
_PORT_PROBE = """\
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((host, port))
except OSError as e:
    print(errno.errorcode.get(e.errno, "E?"), e.strerror)
    sys.exit(3)
"""


async def preflight(runner: Runner, *, dyn_command: Sequence[str], expected_version: str) -> None:
    """Raise LaunchError when dyn is missing, runs on a Python older than
    MIN_PYTHON, or reports a version other than `expected_version`."""
    if not dyn_command:
        raise ValueError("dyn_command is empty")
    node = runner.node.name
    shown = shlex.join(dyn_command)
    found = await runner.run(["sh", "-c", 'command -v -- "$1" || { echo "PATH=$PATH" >&2; exit 127; }',
                              "sh", dyn_command[0]])
    if not found.ok:
        raise LaunchError(f"dyn not installed: {dyn_command[0]!r} is not on the node's PATH "
                          f"({found.stderr.strip()}); install dyn {expected_version} there or set the "
                          "dyn command to its absolute path", node=node)
    exe = found.stdout.strip().splitlines()[-1]
    interpreter = await _interpreter(runner, dyn_command, exe)
    if interpreter:
        await _check_python(runner, interpreter)
    result = await runner.run([*dyn_command, "--version"])
    if not result.ok:
        raise LaunchError(f"`{shown} --version` failed with exit {result.exit_status}: the install "
                          "on the node is broken; reinstall dyn", node=node,
                          log_tail=(result.stderr or result.stdout)[-2000:] or None)
    match = _VERSION_RE.search(result.stdout)
    if match is None:
        raise LaunchError(f"`{shown} --version` printed {result.stdout.strip()[:200]!r}, not "
                          "'dyn <version>': is this another program named dyn?", node=node)
    if match.group(1) != expected_version:
        raise LaunchError(f"dyn version mismatch: the node has {match.group(1)}, this head runs "
                          f"{expected_version}; install dyn=={expected_version} on the node", node=node)


async def check_port_free(runner: Runner, host: str, port: int, *, python: str = "python3") -> None:
    """Raise LaunchError "port in use" when `host:port` cannot be bound on the node.

    Binds with SO_REUSEADDR like our servers, so TIME_WAIT leftovers pass and
    live listeners (also on 0.0.0.0) fail.
    """
    if not 1 <= port <= 65535:
        raise LaunchError(f"port {port} for {host} is outside 1..65535", node=runner.node.name)
    result = await runner.run([python, "-c", _PORT_PROBE, host, str(port)])
    if result.ok:
        return
    where = f"{host}:{port}"
    code = result.stdout.split(" ", 1)[0] if result.exit_status == 3 else ""
    if code == "EADDRINUSE":
        raise LaunchError(f"port in use: {where} is already bound; stop what holds it "
                          f"(`ss -ltnp 'sport = :{port}'`) or choose another port", node=runner.node.name)
    if code == "EADDRNOTAVAIL":
        raise LaunchError(f"cannot bind {where}: {host} is not an address of this node; fix "
                          "bind_address in the topology", node=runner.node.name)
    if code == "EACCES":
        raise LaunchError(f"cannot bind {where}: ports below 1024 need root; choose a port >= 1024",
                          node=runner.node.name)
    detail = (result.stdout + result.stderr).strip()[-300:]
    raise LaunchError(f"cannot check port {where} with {python!r} (exit {result.exit_status}: "
                      f"{detail})", node=runner.node.name)


async def _interpreter(runner: Runner, dyn_command: Sequence[str], exe: str) -> list[str] | None:
    """The Python that runs dyn: argv[0] itself, or the script's #! line."""
    if os.path.basename(dyn_command[0]).startswith("python"):
        return [exe]
    head = await runner.run(["sh", "-c", 'head -c 256 -- "$1" | head -n 1', "sh", exe])
    line = head.stdout.strip()
    if not line.startswith("#!") or "python" not in line:
        return None
    return line[2:].split()


async def _check_python(runner: Runner, interpreter: list[str]) -> None:
    shown = " ".join(interpreter)
    result = await runner.run([*interpreter, "-c", _PY_VERSION])
    try:
        version = tuple(int(part) for part in result.stdout.strip().split("."))
    except ValueError:
        version = ()
    if not result.ok or len(version) != 3:
        raise LaunchError(f"the Python running dyn ({shown}) does not start: exit "
                          f"{result.exit_status} {result.stderr.strip()[-300:]}; reinstall dyn",
                          node=runner.node.name)
    if version < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        raise LaunchError(f"Python too old: dyn runs on {shown} = Python "
                          f"{'.'.join(map(str, version))}, it needs >= {need}; install Python {need}+ "
                          "and reinstall dyn with it", node=runner.node.name)
