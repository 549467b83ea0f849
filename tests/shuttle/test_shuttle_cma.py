"""Cross-memory attach (the shm transport's "direct" mode): reads another process's memory, and
says when that process is gone instead of reading whatever now holds its pid."""

from __future__ import annotations

import errno
import subprocess
import sys

import numpy as np
import pytest

from dyn.shuttle import cma

pytestmark = pytest.mark.skipif(not (cma.sender_allows() and cma.receiver_can()),
                                reason="process_vm_readv is not allowed here (Yama ptrace_scope, seccomp)")

_CHILD = ("import numpy as np, sys; a = np.arange(1 << 16, dtype=np.uint32).view(np.uint8); "
          "print(a.ctypes.data, flush=True); sys.stdin.read()")


def test_reads_a_live_process_and_fails_clearly_once_it_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        address = int(child.stdout.readline())
        target = cma.Target(child.pid)
        dest = np.zeros(1 << 18, dtype=np.uint8)
        halves = [(cma.address_of(dest[1 << 17:]), 1 << 17), (cma.address_of(dest[:1 << 17]), 1 << 17)]
        cma.read_into(child.pid, halves, [(address + (1 << 17), 1 << 17), (address, 1 << 17)])
        expected = np.arange(1 << 16, dtype=np.uint32).view(np.uint8)
        assert np.array_equal(dest, expected) and target.alive()
        with pytest.raises(cma.CmaError) as bad_address:
            cma.read_into(child.pid, halves[:1], [(8, 1 << 17)])
        child.communicate("", timeout=10)  # exits and is reaped
        assert not target.alive()
        with pytest.raises(cma.CmaError) as gone:
            cma.read_into(child.pid, halves[:1], [(address, 1 << 17)])
        target.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert bad_address.value.errno == errno.EFAULT and "0 of 131072 bytes" in str(bad_address.value)
    assert gone.value.errno == errno.ESRCH
