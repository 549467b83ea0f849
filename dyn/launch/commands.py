"""Shell commands the runners send, built as plain data so tests can read them.

Every helper returns an argv (`("sh", "-c", script)`) that works the same
through a local subprocess and through an SSH channel: the SSH runner joins
it with `shlex.join`, the local runner executes it directly. Only POSIX sh,
coreutils and util-linux `setsid` are assumed on a node.
"""

from __future__ import annotations

import os
import re
import shlex
import signal as _signal

from dyn.launch.runner import ProcessSpec

NOT_FOUND_STATUS = 127
"""Exit status of the detached-start script when argv[0] is not on PATH."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def detached_argv(spec: ProcessSpec) -> tuple[str, ...]:
    """Start `spec` in a new session, print its pid, return at once.

    The child gets stdin from /dev/null and appends stdout+stderr to the log,
    so nothing holds the SSH channel open; `setsid` makes its pid the
    process-group id, so `signal(pid, group=True)` reaches its children too.
    """
    if not spec.argv:
        raise ValueError(f"process {spec.name!r}: argv is empty")
    if not spec.log_path:
        raise ValueError(f"process {spec.name!r}: log_path is empty")
    lines = ["set -e"]
    for key, value in spec.env:
        if not _ENV_NAME.match(key):
            raise ValueError(f"process {spec.name!r}: invalid environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    log_dir = os.path.dirname(spec.log_path)
    if log_dir:
        lines.append(f"mkdir -p -- {shlex.quote(log_dir)}")
    if spec.cwd:
        lines.append(f"cd -- {shlex.quote(spec.cwd)}")
    exe = shlex.quote(spec.argv[0])
    lines.append(f"command -v -- {exe} >/dev/null 2>&1 || "
                 f"{{ echo \"command not found: \"{exe} >&2; exit {NOT_FOUND_STATUS}; }}")
    lines.append(f"setsid {shlex.join(spec.argv)} </dev/null >>{shlex.quote(spec.log_path)} 2>&1 &")
    lines.append("echo $!")
    return ("sh", "-c", "\n".join(lines))


def is_alive_argv(pid: int) -> tuple[str, ...]:
    """Exit 0 when `pid` runs (zombies count as dead), 1 when it does not."""
    _check_pid(pid)
    script = (
        f"[ -d /proc/self ] || {{ kill -0 {pid} 2>/dev/null; exit $?; }}\n"
        f"s=$(cat /proc/{pid}/stat 2>/dev/null) || exit 1\n"
        "s=${s##*) }\n"
        "case $s in Z*|X*) exit 1;; esac\n"
        "exit 0"
    )
    return ("sh", "-c", script)


def signal_argv(pid: int, sig: int, *, group: bool) -> tuple[str, ...]:
    """Send `sig` to a process (or its group); a target already gone is success."""
    _check_pid(pid)
    name = _signal.Signals(sig).name.removeprefix("SIG")
    target = f"-{pid}" if group else str(pid)
    script = (
        f"err=$(kill -s {name} -- {target} 2>&1) && exit 0\n"
        'case $err in *"No such process"*) exit 0;; esac\n'
        'echo "$err" >&2\nexit 2'
    )
    return ("sh", "-c", script)


def put_text_argv(remote_path: str, mode: int) -> tuple[str, ...]:
    """Write stdin to `remote_path` atomically with `mode`, creating parent dirs.

    umask 077 means the file is never readable by others, even before chmod.
    """
    if not remote_path:
        raise ValueError("remote_path is empty")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"file mode {mode!r} for {remote_path} is not a permission mode")
    path = shlex.quote(remote_path)
    tmp = shlex.quote(remote_path + ".tmp") + ".$$"
    lines = ["umask 077"]
    parent = os.path.dirname(remote_path)
    if parent:
        lines.append(f"mkdir -p -- {shlex.quote(parent)} || exit 1")
    lines.append(f"cat > {tmp} && chmod {mode:o} {tmp} && mv -f -- {tmp} {path} "
                 f"|| {{ rm -f -- {tmp}; exit 1; }}")
    return ("sh", "-c", "\n".join(lines))


def tail_argv(path: str, num_lines: int) -> tuple[str, ...]:
    """Last `num_lines` lines of `path`; empty output when the file is absent."""
    if num_lines < 1:
        raise ValueError(f"num_lines must be >= 1, got {num_lines}")
    quoted = shlex.quote(path)
    return ("sh", "-c", f"[ -e {quoted} ] || exit 0\ntail -n {int(num_lines)} -- {quoted}")


def _check_pid(pid: int) -> None:
    # kill -- -1 / -0 would hit every process we may signal: refuse outright.
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise ValueError(f"refusing to act on pid {pid!r}: expected a process id > 1")
