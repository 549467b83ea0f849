"""A SIGKILLed vLLM worker leaves its KV-event sockets in the temp dir: the next worker on the node removes them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from dyn.launch.local import remove_files_of_dead_processes
from dyn.worker.process_startup import VLLM_KV_EVENTS_SOCKET


def test_sockets_of_dead_workers_go_and_those_of_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    names = [f"dyn-vllm-kv-{dead_pid}", f"dyn-vllm-kv-{dead_pid}-replay", f"dyn-vllm-kv-{os.getpid()}",
             f"dyn-vllm-kv-{dead_pid}.log", "dyn-vllm-kv-notapid"]
    for name in names:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / name))  # real socket files, as ZMQ's ipc:// leaves them
    removed = remove_files_of_dead_processes(str(tmp_path), VLLM_KV_EVENTS_SOCKET)
    assert sorted(removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])
