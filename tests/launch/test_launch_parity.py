"""The local runner and the SSH runner give the same answers to the same calls."""

from __future__ import annotations

import asyncio
import signal
import stat
from pathlib import Path

import pytest
from launch_helpers import FAST, kill_groups, local_node, ssh_node
from sshd import write_known_hosts

from dyn.errors import LaunchError
from dyn.launch.runner import ProcessSpec, Runner
from dyn.launch.ssh import connect

COMMANDS = [
    ["echo", "a b", "$HOME", "'q'"],           # arguments arrive verbatim, no shell expansion
    ["sh", "-c", "echo out; echo err >&2; exit 3"],
    ["cat"],                                   # stdin is fed from `input`
    ["no-such-command-dyn-xyz"],
    ["sh", "-c", "kill -TERM $$"],
]


async def _observe(runner: Runner, tmp: Path, tag: str, pids: list[int]) -> list[object]:
    seen: list[object] = []
    for argv in COMMANDS:
        result = await runner.run(argv, input="piped\n" if argv == ["cat"] else None)
        # Shells word the not-found message differently; the status is the contract.
        stderr = "" if result.exit_status == 127 else result.stderr
        seen.append((result.exit_status, result.stdout, stderr))
    key = tmp / tag / "keys" / "node.key"
    await runner.put_text("secret\n", str(key))
    seen.append((key.read_text(), stat.S_IMODE(key.stat().st_mode)))
    seen.append(await runner.read_tail(str(key), 5))
    seen.append(await runner.read_tail(str(tmp / tag / "missing.log")))
    log = tmp / tag / "p.log"
    proc = await runner.start_detached(ProcessSpec("p", ("sh", "-c", 'echo "v=$V"; exec sleep 30'),
                                                   str(log), env=(("V", "1 2"),)))
    pids.append(proc.pid)
    seen.append((proc.node, proc.name, proc.log_path == str(log), await runner.is_alive(proc.pid)))
    await runner.signal(proc.pid, signal.SIGKILL)
    for _ in range(100):
        if not await runner.is_alive(proc.pid):
            break
        await asyncio.sleep(0.02)
    seen.append(await runner.is_alive(proc.pid))
    seen.append(await runner.read_tail(str(log)))
    with pytest.raises(LaunchError, match="not found on PATH") as info:
        await runner.start_detached(ProcessSpec("q", ("no-such-command-dyn-xyz",), str(log)))
    seen.append((info.value.node, info.value.process))
    return seen


def test_local_and_ssh_runners_agree(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    known = write_known_hosts(tmp_path / "kh", [host])
    pids: list[int] = []

    async def go() -> tuple[list[object], list[object]]:
        local = await connect(local_node("n1"), FAST)
        remote = await connect(ssh_node(host, known, name="n1"), FAST)
        try:
            return (await _observe(local, tmp_path, "local", pids),
                    await _observe(remote, tmp_path, "ssh", pids))
        finally:
            await local.close()
            await remote.close()

    try:
        local_seen, ssh_seen = asyncio.run(go())
    finally:
        kill_groups(pids)
    assert local_seen == ssh_seen
    assert local_seen[:5] == [(0, "a b $HOME 'q'\n", ""), (3, "out\n", "err\n"), (0, "piped\n", ""),
                              (127, "", ""), (128 + 15, "", "")]
    assert local_seen[5:] == [("secret\n", 0o600), "secret\n", "", ("n1", "p", True, True), False,
                              "v=1 2\n", ("n1", "q")]
