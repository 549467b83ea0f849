"""Preflight against real installs and hand-made broken ones, locally and over SSH."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path

import pytest
from launch_helpers import FAST, local_node, ssh_node
from sshd import write_known_hosts

import dyn
from dyn.errors import LaunchError
from dyn.launch.local import LocalRunner
from dyn.launch.preflight import check_port_free, preflight
from dyn.launch.ssh import connect

REAL_DYN = str(Path(sys.executable).parent / "dyn")


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _check(dyn_command: list[str], version: str = dyn.__version__) -> None:
    asyncio.run(preflight(LocalRunner(local_node()), dyn_command=dyn_command, expected_version=version))


def test_real_install_passes_over_ssh(sshd_hosts, tmp_path) -> None:
    if not Path(REAL_DYN).exists():
        pytest.skip(f"no dyn entry point at {REAL_DYN}")
    [host] = sshd_hosts(1)
    node = ssh_node(host, write_known_hosts(tmp_path / "kh", [host]))

    async def go() -> None:
        runner = await connect(node, FAST)
        try:
            await preflight(runner, dyn_command=[REAL_DYN], expected_version=dyn.__version__)
        finally:
            await runner.close()

    asyncio.run(go())


def test_dyn_missing() -> None:
    with pytest.raises(LaunchError, match=r"\[local\] dyn not installed: 'dyn-missing-xyz' is not on "
                                          r"the node's PATH \(PATH=.*\); install dyn 0.1.0"):
        _check(["dyn-missing-xyz"], "0.1.0")


def test_version_mismatch(tmp_path) -> None:
    fake = _script(tmp_path / "dyn", "#!/bin/sh\necho 'dyn 0.0.9'\n")
    with pytest.raises(LaunchError, match="dyn version mismatch: the node has 0.0.9, this head runs "
                                          "0.1.0; install dyn==0.1.0 on the node"):
        _check([fake], "0.1.0")
    _check([fake], "0.0.9")


def test_python_too_old(tmp_path) -> None:
    old_python = _script(tmp_path / "python3.8", "#!/bin/sh\necho 3.8.10\n")
    fake = _script(tmp_path / "dyn", f"#!{old_python}\nimport dyn\n")
    with pytest.raises(LaunchError, match=rf"Python too old: dyn runs on {old_python} = Python 3.8.10, "
                                          r"it needs >= 3.11"):
        _check([fake])
    # `python -m dyn` style commands are checked through argv[0] itself.
    with pytest.raises(LaunchError, match="Python too old"):
        _check([old_python, "-m", "dyn.cli.main"])


def test_broken_install_shows_its_output(tmp_path) -> None:
    fake = _script(tmp_path / "dyn", "#!/bin/sh\necho 'ModuleNotFoundError: typer' >&2\nexit 1\n")
    with pytest.raises(LaunchError, match=r"--version` failed with exit 1") as info:
        _check([fake])
    assert info.value.log_tail == "ModuleNotFoundError: typer\n"


def test_other_program_named_dyn(tmp_path) -> None:
    fake = _script(tmp_path / "dyn", "#!/bin/sh\necho 'Dynamic DNS client v2'\n")
    with pytest.raises(LaunchError, match="is this another program named dyn"):
        _check([fake])


def test_port_in_use_local_and_ssh(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    node = ssh_node(host, write_known_hosts(tmp_path / "kh", [host]))
    with socket.socket() as busy, socket.socket() as probe:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()

        async def go() -> None:
            for runner in (LocalRunner(local_node()), await connect(node, FAST)):
                with pytest.raises(LaunchError, match=rf"port in use: 127.0.0.1:{port} is already bound"):
                    await check_port_free(runner, "127.0.0.1", port)
                await check_port_free(runner, "127.0.0.1", free)
                with pytest.raises(LaunchError, match="192.0.2.1 is not an address of this node"):
                    await check_port_free(runner, "192.0.2.1", free)
                with pytest.raises(LaunchError, match="port 70000 for 127.0.0.1 is outside 1..65535"):
                    await check_port_free(runner, "127.0.0.1", 70000)
                await runner.close()

        asyncio.run(go())
