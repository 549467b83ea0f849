"""RunnerPool: fan-out that reports every node, bounded concurrency, reconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest
from launch_helpers import FAST, local_node, ssh_node
from sshd import free_port, write_known_hosts

from dyn.errors import LaunchError
from dyn.launch.pool import RunnerPool
from dyn.launch.runner import Runner
from dyn.launch.ssh import SshRunner


def test_gather_reports_every_node(sshd_hosts, tmp_path) -> None:
    hosts = sshd_hosts(2)
    known = write_known_hosts(tmp_path / "kh", hosts)
    dead = ssh_node(dataclasses.replace(hosts[0], port=free_port()), known, name="dead")
    nodes = [ssh_node(hosts[0], known, "a"), dead, ssh_node(hosts[1], known, "b"), local_node("c")]

    async def hostname(runner: Runner) -> str:
        result = await runner.run(["sh", "-c", "echo ${SSH_CONNECTION:-local}"])
        return result.stdout.split()[-1]

    async def go() -> dict[str, object]:
        async with RunnerPool(nodes, FAST) as pool:
            return await pool.gather(hostname, ["a", "dead", "b", "c"])

    results = asyncio.run(go())
    assert list(results) == ["a", "dead", "b", "c"]
    assert results["a"] == str(hosts[0].port) and results["b"] == str(hosts[1].port)
    assert results["c"] == "local"
    assert isinstance(results["dead"], LaunchError) and "host unreachable" in str(results["dead"])
    assert results["dead"].node == "dead"


def test_concurrency_is_bounded() -> None:
    nodes = [local_node(f"n{i}") for i in range(6)]
    in_flight, peak = 0, 0

    async def work(runner: Runner) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return runner.node.name

    async def go() -> dict[str, object]:
        async with RunnerPool(nodes, FAST, max_concurrency=2) as pool:
            return await pool.gather(work)

    assert asyncio.run(go()) == {n.name: n.name for n in nodes}
    assert peak == 2


def test_reconnects_after_the_connection_drops(sshd_hosts, tmp_path) -> None:
    [host] = sshd_hosts(1)
    node = ssh_node(host, write_known_hosts(tmp_path / "kh", [host]))

    async def go() -> None:
        async with RunnerPool([node], FAST) as pool:
            first = await pool.get("n1")
            assert await pool.get("n1") is first
            # Kill the server side of the session, as a crashed link would.
            for pid in _children(host.pid):
                os.kill(pid, signal.SIGKILL)
            assert isinstance(first, SshRunner)
            for _ in range(100):
                if not first.is_connected:
                    break
                await asyncio.sleep(0.02)
            second = await pool.get("n1")
            assert second is not first
            assert (await second.run(["echo", "back"])).stdout == "back\n"

    asyncio.run(go())


def test_unknown_node_and_bad_arguments() -> None:
    async def go() -> None:
        async with RunnerPool([local_node("a")], FAST) as pool:
            with pytest.raises(LaunchError, match=r"unknown node 'zz'; the pool has \['a'\]"):
                await pool.get("zz")
            results = await pool.gather(lambda r: r.run(["true"]), ["a", "zz"])
            assert results["a"].ok and isinstance(results["zz"], LaunchError)

    asyncio.run(go())
    with pytest.raises(ValueError, match="unique"):
        RunnerPool([local_node("a"), local_node("a")], FAST)
    with pytest.raises(ValueError, match="max_concurrency"):
        RunnerPool([local_node("a")], FAST, max_concurrency=0)


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found
