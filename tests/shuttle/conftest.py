"""Peers in separate processes, always reaped by PID even when a test fails."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

PEER = Path(__file__).with_name("shuttle_peer.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spawn_peer() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(PEER), *args], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        try:
            proc.communicate(input="", timeout=5)  # closing stdin stops a sender cleanly
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
