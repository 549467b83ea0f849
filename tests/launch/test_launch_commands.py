"""The shell snippets as data, and their behaviour through a real local shell."""

from __future__ import annotations

import asyncio
import os
import signal
import stat

import pytest
from launch_helpers import kill_groups, local_node

from dyn.errors import LaunchError
from dyn.launch import commands
from dyn.launch.local import LocalRunner
from dyn.launch.runner import CommandResult, ProcessSpec, Runner


@pytest.mark.parametrize("pid", [0, 1, -5, True, "12"])
def test_refuses_dangerous_pids(pid: object) -> None:
    # kill -- -1 would signal every process we own.
    with pytest.raises(ValueError, match="refusing to act on pid"):
        commands.signal_argv(pid, signal.SIGTERM, group=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refusing"):
        commands.is_alive_argv(pid)  # type: ignore[arg-type]


def test_signal_targets_group_or_pid() -> None:
    assert "kill -s TERM -- -4242" in commands.signal_argv(4242, signal.SIGTERM, group=True)[2]
    assert "kill -s KILL -- 4242" in commands.signal_argv(4242, signal.SIGKILL, group=False)[2]


def test_detached_script_quotes_and_exports() -> None:
    spec = ProcessSpec("w", ("dyn", "worker", "a b;rm -rf /"), "/tmp/x y/w.log",
                       env=(("DYN_ROLE", "decode 'x'"),), cwd="/srv/d")
    argv = commands.detached_argv(spec)
    assert argv[:2] == ("sh", "-c")
    script = argv[2]
    assert "export DYN_ROLE='decode '\"'\"'x'\"'\"''" in script
    assert "setsid dyn worker 'a b;rm -rf /' </dev/null >>'/tmp/x y/w.log' 2>&1 &" in script
    assert "cd -- /srv/d" in script and script.endswith("echo $!")


@pytest.mark.parametrize("spec, message", [
    (ProcessSpec("w", (), "/tmp/l"), "argv is empty"),
    (ProcessSpec("w", ("x",), ""), "log_path is empty"),
    (ProcessSpec("w", ("x",), "/tmp/l", env=(("BAD-NAME", "1"),)), "invalid environment variable name 'BAD-NAME'"),
])
def test_bad_specs_are_named(spec: ProcessSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        commands.detached_argv(spec)


def test_local_runner_satisfies_protocol() -> None:
    assert isinstance(LocalRunner(local_node()), Runner)


def test_start_detached_env_cwd_and_log(tmp_path) -> None:
    runner = LocalRunner(local_node())
    log = tmp_path / "logs" / "p.log"
    spec = ProcessSpec("p", ("sh", "-c", 'echo "role=$DYN_ROLE cwd=$(pwd)"; echo oops >&2'),
                       str(log), env=(("DYN_ROLE", "prefill x"),), cwd=str(tmp_path))

    async def go() -> None:
        proc = await runner.start_detached(spec)
        try:
            for _ in range(200):
                if not await runner.is_alive(proc.pid):
                    break
                await asyncio.sleep(0.01)
            assert await runner.read_tail(str(log)) == f"role=prefill x cwd={tmp_path}\noops\n"
        finally:
            kill_groups([proc.pid])

    asyncio.run(go())


def test_start_missing_command_is_a_launch_error(tmp_path) -> None:
    runner = LocalRunner(local_node())
    spec = ProcessSpec("w", ("no-such-dyn-binary", "worker"), str(tmp_path / "w.log"))
    with pytest.raises(LaunchError, match="'no-such-dyn-binary' not found on PATH") as info:
        asyncio.run(runner.start_detached(spec))
    assert info.value.node == "local" and info.value.process == "w"


def test_put_text_is_atomic_private_and_creates_dirs(tmp_path) -> None:
    runner = LocalRunner(local_node())
    path = tmp_path / "a" / "b" / "key.secret"
    asyncio.run(runner.put_text("first\n", str(path)))
    asyncio.run(runner.put_text("second\n", str(path), mode=0o640))
    assert path.read_text() == "second\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["key.secret"]  # no temp files left


def test_put_text_into_unwritable_place_names_path(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LaunchError, match=f"cannot write {blocker}/k"):
        asyncio.run(LocalRunner(local_node()).put_text("x", str(blocker / "k")))


def test_read_tail_of_missing_file_is_empty(tmp_path) -> None:
    runner = LocalRunner(local_node())
    assert asyncio.run(runner.read_tail(str(tmp_path / "none.log"))) == ""
    (tmp_path / "l").write_text("".join(f"{i}\n" for i in range(50)))
    assert asyncio.run(runner.read_tail(str(tmp_path / "l"), 3)) == "47\n48\n49\n"


def test_local_run_timeout_kills_tree_and_raises() -> None:
    runner = LocalRunner(local_node())
    with pytest.raises(LaunchError, match=r"timed out after 0.3s: sh -c"):
        asyncio.run(runner.run(["sh", "-c", "sleep 20 & sleep 20"], timeout_s=0.3))


def test_local_run_reports_signal_as_128_plus_n() -> None:
    result = asyncio.run(LocalRunner(local_node()).run(["sh", "-c", "kill -9 $$"]))
    assert result == CommandResult(128 + 9, "", "")
