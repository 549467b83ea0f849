"""The shell probes the daemon runs on nodes, run for real with sh."""

import os
import subprocess
import sys
import time

from dyn.planner.nodes import alive_script, owned_script


def _sh(script: str) -> set[int]:
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10, check=True).stdout
    return {int(x) for x in out.split()}


def test_alive_counts_zombies_and_missing_pids_as_dead():
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # let `true` exit; we do not reap it yet
            with open(f"/proc/{zombie.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        assert _sh(alive_script([live.pid, zombie.pid, 4_000_000])) == {live.pid}
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_owned_requires_the_marker_in_the_command_line():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-decode-0.json"])
    try:
        assert _sh(owned_script({proc.pid: "marker-decode-0.json"})) == {proc.pid}
        assert _sh(owned_script({proc.pid: "marker-decode-1.json"})) == set()
        assert _sh(owned_script({os.getpid(): "it's quoted; $(true)"})) == set()
    finally:
        proc.kill()
        proc.wait()


def test_owned_counts_an_exiting_process_until_it_is_a_zombie():
    """A killed process releasing much memory has an empty command line for a while, yet runs:
    `dyn down` must wait for it (it held the memory, ports and GPUs of a worker)."""
    from dyn.launch.local import pid_alive

    code = ("import time; b = bytearray(1 << 30); b[::4096] = bytes(len(b) >> 12); print(1, flush=True); "
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, "marker-decode-0.json"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"1"
        proc.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            owned = _sh(owned_script({proc.pid: "marker-decode-0.json"}))
            if not owned:
                break
        assert not pid_alive(proc.pid), "owned_script reported a process gone that still runs"
    finally:
        proc.kill()
        proc.wait()


def test_put_files_writes_private_files_verbatim(tmp_path):
    from dyn.planner.nodes import put_files_script

    tricky = '{"secret": "$HOME `id` \'single\' \\"double\\"", "eof": "EOF"}'
    files = {str(tmp_path / "run" / "decode-0.keys.json"): tricky, str(tmp_path / "run" / "x.txt"): "a\nb"}
    subprocess.run(["sh", "-c", put_files_script(files)], check=True, timeout=10)
    for path, text in files.items():
        assert open(path).read() == text + "\n"
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o700
