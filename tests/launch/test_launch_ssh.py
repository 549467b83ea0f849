"""SSH runner against a real OpenSSH server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from launch_helpers import FAST, kill_groups, ssh_node
from sshd import free_port, keygen, sshd_available, start_sshd, write_known_hosts

from dyn.errors import LaunchError
from dyn.launch.runner import ProcessSpec
from dyn.launch.ssh import SshOptions, SshRunner, connect


def test_wrong_key_is_auth_refused(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    known = write_known_hosts(tmp_path / "known_hosts", [host])
    stranger = keygen(tmp_path / "id_stranger")
    node = ssh_node(host, known, identity_file=str(stranger))
    with pytest.raises(LaunchError) as info:
        asyncio.run(connect(node, FAST))
    assert f"auth refused for {host.user}@127.0.0.1:{host.port} with identity {stranger}" in str(info.value)
    assert "authorized_keys" in str(info.value) and info.value.node == "n1"


def test_missing_identity_file_is_named(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    node = ssh_node(host, str(tmp_path / "kh"), identity_file=str(tmp_path / "nope"))
    with pytest.raises(LaunchError, match=f"identity_file {tmp_path}/nope does not exist"):
        asyncio.run(connect(node, FAST))


def test_unknown_host_key_is_refused(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    known = tmp_path / "known_hosts"  # does not exist: nothing is known
    with pytest.raises(LaunchError, match=rf"unknown host key for \[127.0.0.1\]:{host.port}.*--accept-new-host-keys"):
        asyncio.run(connect(ssh_node(host, str(known)), FAST))
    assert not known.exists()


def test_accept_new_records_the_key_then_verifies_it(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    known = tmp_path / "dir" / "known_hosts"
    node = ssh_node(host, str(known))

    async def go() -> None:
        runner = await connect(node, dataclasses.replace(FAST, accept_new_host_keys=True))
        await runner.close()
        assert known.read_text() == host.known_hosts_line + "\n"
        assert known.stat().st_mode & 0o777 == 0o600
        runner = await connect(node, FAST)  # now known without the flag
        assert (await runner.run(["true"])).ok
        await runner.close()

    asyncio.run(go())


def test_changed_host_key_is_refused_even_with_accept_new(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    impostor = keygen(tmp_path / "other_host_key")
    other_pub = " ".join(Path(f"{impostor}.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{host.port} {other_pub}\n")
    options = dataclasses.replace(FAST, accept_new_host_keys=True)
    with pytest.raises(LaunchError, match=r"does NOT match .*ssh-keygen -R"):
        asyncio.run(connect(ssh_node(host, str(known)), options))
    assert known.read_text() == f"[127.0.0.1]:{host.port} {other_pub}\n"


def test_unreachable_port_retries_then_fails(tmp_path, sshd_hosts) -> None:
    [host] = sshd_hosts(1)
    closed = dataclasses.replace(host, port=free_port())
    options = SshOptions(connect_timeout_s=2, retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        asyncio.run(connect(ssh_node(closed, str(tmp_path / "kh")), options))
    elapsed = time.monotonic() - start
    assert f"host unreachable: cannot connect to {host.user}@127.0.0.1:{closed.port} after 3 attempt(s)" \
        in str(info.value)
    assert 0.15 <= elapsed < 3  # waited 0.05 + 0.1 between attempts


def test_detached_process_survives_channel_close_and_dies_by_group(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    node = ssh_node(host, write_known_hosts(tmp_path / "kh", [host]))
    log = tmp_path / "logs" / "w.log"
    # A parent with a child: a group signal must reach both.
    spec = ProcessSpec("w", ("sh", "-c", "sleep 60 & echo child=$!; wait"), str(log))
    started: list[int] = []

    async def go() -> None:
        runner = await connect(node, FAST)
        proc = await runner.start_detached(spec)
        started.append(proc.pid)
        await runner.close()  # channel and connection gone
        await asyncio.sleep(0.2)
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(") ", 1)[1].split()
        assert int(fields[2]) == proc.pid and int(fields[3]) == proc.pid  # pgid, sid
        runner = await connect(node, FAST)
        assert await runner.is_alive(proc.pid)
        child = int(log.read_text().split("child=")[1].split()[0])
        assert await runner.is_alive(child)
        await runner.signal(proc.pid, signal.SIGTERM)
        for _ in range(100):
            if not (await runner.is_alive(proc.pid) or await runner.is_alive(child)):
                break
            await asyncio.sleep(0.02)
        assert not await runner.is_alive(proc.pid) and not await runner.is_alive(child)
        await runner.signal(proc.pid)  # already gone: no error
        await runner.close()

    try:
        asyncio.run(go())
    finally:
        kill_groups(started)


def test_run_timeout_and_dropped_connection(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    node = ssh_node(host, write_known_hosts(tmp_path / "kh", [host]))

    async def go() -> None:
        runner = await connect(node, FAST)
        assert isinstance(runner, SshRunner)
        with pytest.raises(LaunchError, match="timed out after 0.3s: sleep 5"):
            await runner.run(["sleep", "5"], timeout_s=0.3)
        assert (await runner.run(["echo", "still", "usable"])).stdout == "still usable\n"
        await runner.close()
        assert not runner.is_connected
        with pytest.raises(LaunchError, match="lost while running"):
            await runner.run(["true"])

    asyncio.run(go())


def test_distinct_loopback_addresses(sshd_hosts, tmp_path) -> None:
    hosts = sshd_hosts(2, distinct_addresses=True)
    assert [h.host for h in hosts] == ["127.0.0.1", "127.0.0.2"]
    known = write_known_hosts(tmp_path / "kh", hosts)

    async def go() -> list[str]:
        out = []
        for i, h in enumerate(hosts):
            runner = await connect(ssh_node(h, known, name=f"n{i}"), FAST)
            out.append((await runner.run(["sh", "-c", "echo $SSH_CONNECTION"])).stdout.split()[2])
            await runner.close()
        return out

    assert asyncio.run(go()) == ["127.0.0.1", "127.0.0.2"]
    assert all(os.path.exists(f"/proc/{h.pid}") for h in hosts)


@pytest.mark.skipif(not sshd_available(), reason="needs /usr/sbin/sshd")
def test_sshd_helper_kills_its_server(tmp_path) -> None:
    with start_sshd(tmp_path) as host:
        with socket.create_connection((host.host, host.port), timeout=2) as s:
            assert s.recv(8).startswith(b"SSH-2.0")
        assert host.known_hosts_line.startswith(f"[127.0.0.1]:{host.port} ssh-ed25519 ")
    assert not os.path.exists(f"/proc/{host.pid}")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host.host, host.port), timeout=2).close()
