"""Cross-memory attach: one process reads another's memory with process_vm_readv(2).

The shm transport's "direct" mode uses it: the receiver copies the sender's
pinned blocks straight into its destination views, one copy made by the
kernel, with no staging ring and no work on the sender per byte (UCX's CMA
transport, which NIXL uses within a node, does the same).

Linux allows it where the caller may ptrace the target: same user, and Yama's
ptrace_scope 0 (or absent); a seccomp profile can forbid the call. The sender
checks Yama before offering the mode (`sender_allows`), the receiver tries the
call on itself once (`receiver_can`). A target that dies fails the call with
ESRCH; a pidfd taken at the start of a transfer proves the pid still names
the same process after each read (`Target.alive`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import sys
from collections.abc import Sequence

import numpy as np

IOV_MAX = 1024
_YAMA = "/proc/sys/kernel/yama/ptrace_scope"


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "process_vm_readv", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                   ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return libc


_LIBC = _libc()


class CmaError(OSError):
    """A read failed; errno says why (ESRCH: the target is gone, EPERM: not allowed, EFAULT: bad address)."""


def sender_allows() -> bool:
    """Whether a process on this host may read this one's memory (Yama permits same-user reads)."""
    return not sender_refusal()


def sender_refusal() -> str:
    """Why no other process may read this one's memory ("" when a same-user one may)."""
    if _LIBC is None or not hasattr(os, "pidfd_open"):
        return "process_vm_readv or pidfd_open is missing on this platform"
    try:
        with open(_YAMA) as f:
            scope = f.read().strip()
    except OSError:
        return ""  # no Yama: the ordinary same-user ptrace rule applies
    return "" if scope == "0" else f"Yama's kernel.yama.ptrace_scope is {scope}, not 0"


def receiver_can() -> bool:
    """Whether this process may call process_vm_readv at all (a seccomp filter may forbid it)."""
    if _LIBC is None or not hasattr(os, "pidfd_open"):
        return False
    src = np.arange(8, dtype=np.uint8)
    dst = np.zeros(8, dtype=np.uint8)
    try:
        read_into(os.getpid(), [(address_of(dst), 8)], [(address_of(src), 8)])
    except CmaError:
        return False
    return bool((src == dst).all())


def address_of(view: object) -> int:
    """The address of a host block view's first byte (memoryview, numpy array, bytearray or CPU
    tensor); c_char.from_buffer takes ~0.2 us where ndarray.ctypes.data takes ~0.7."""
    data_ptr = getattr(view, "data_ptr", None)
    if data_ptr is not None:
        return int(data_ptr())
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))  # type: ignore[arg-type]
    except TypeError:  # a read-only buffer
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]


def read_into(pid: int, dests: Sequence[tuple[int, int]], sources: Sequence[tuple[int, int]]) -> None:
    """Copy the remote (address, length) regions of process `pid`, in order, into the local ones
    (the same total); runs of adjacent blocks on either side become one iovec. CmaError unless
    every byte arrived."""
    assert _LIBC is not None
    local, remote = _runs(dests), _runs(sources)
    if len(local) <= IOV_MAX and len(remote) <= IOV_MAX:
        _readv(pid, local, remote)
        return
    assert len(dests) == len(sources)
    for start in range(0, len(dests), IOV_MAX):  # fragmented: block by block, IOV_MAX at a time
        _readv(pid, dests[start:start + IOV_MAX], sources[start:start + IOV_MAX])


def _runs(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for address, size in regions:
        if runs and runs[-1][0] + runs[-1][1] == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((address, size))
    return runs


def _readv(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> None:
    want = sum(size for _, size in local)
    if want != sum(size for _, size in remote):
        raise CmaError(errno.EINVAL, f"process_vm_readv: {want} local bytes for "
                                     f"{sum(size for _, size in remote)} remote")
    lvec = (_Iovec * len(local))(*(_Iovec(a, n) for a, n in local))
    rvec = (_Iovec * len(remote))(*(_Iovec(a, n) for a, n in remote))
    assert _LIBC is not None
    got = _LIBC.process_vm_readv(pid, lvec, len(local), rvec, len(remote), 0)
    if got != want:
        code = ctypes.get_errno() if got < 0 else errno.EFAULT
        raise CmaError(code, f"process_vm_readv from pid {pid}: {os.strerror(code)} ({max(got, 0)} of {want} bytes)")


class Target:
    """A sender process held by a pidfd, so its pid cannot silently name another process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.pidfd_open(pid)
        except OSError as exc:
            raise CmaError(exc.errno or errno.ESRCH, f"sender pid {pid}: {exc.strerror}") from None

    def alive(self) -> bool:
        """False once the process has exited (its pidfd turns readable)."""
        return not select.select([self._fd], [], [], 0)[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
