"""A SIGKILLed vLLM worker leaves its KV-event sockets and vLLM's rendezvous file in the temp dir: the next
worker on the node removes them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

from dyn.engine.vllm_rendezvous import mark_store, remove_stores_of_dead_processes
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


def test_the_rendezvous_file_of_a_sigkilled_engine_goes_with_its_marker(tmp_path):
    """vLLM's torch FileStore (a uuid name, no owner in it): the engine marks it with its pid; once
    that process is gone the next worker removes both. Live markers, other names and markers that
    name a file outside vLLM's form are left alone (beyond the dead marker itself)."""
    store = f"vllm_dist_{uuid.uuid4().hex}"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys, torch.distributed as dist\n"
        "from dyn.engine.vllm_rendezvous import mark_store\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "print(mark_store(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), str(tmp_path / store)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    marker = tmp_path / killed.stdout.strip().rsplit("/", 1)[-1]
    assert marker.name.startswith("dyn-vllm-store-") and marker.read_text() == store
    live_store = f"vllm_dist_{uuid.uuid4().hex}"
    (tmp_path / live_store).write_text("")
    (tmp_path / f"dyn-vllm-store-{os.getpid()}").write_text(live_store)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    (tmp_path / "precious").write_text("")
    (tmp_path / f"dyn-vllm-store-{dead_pid}").write_text("precious")

    assert remove_stores_of_dead_processes(str(tmp_path)) == [store]
    assert sorted(os.listdir(tmp_path)) == sorted([live_store, f"dyn-vllm-store-{os.getpid()}", "precious"])


def test_no_marker_without_a_file_store():
    assert mark_store() is None  # this process has no torch.distributed group
