"""Shared fixtures. `sshd_hosts(n)` starts n real OpenSSH servers on loopback.

tests/ is on sys.path (rootdir conftest, no __init__.py), so test modules
import the helpers as `from sshd import SshdHandle, write_known_hosts`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from sshd import SshdHandle, sshd_available, start_sshd_hosts


@pytest.fixture
def sshd_hosts(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Callable[..., list[SshdHandle]]]:
    """Factory: `sshd_hosts(n, distinct_addresses=False)`; all stopped at teardown."""
    if not sshd_available():
        pytest.skip("needs /usr/sbin/sshd and ssh-keygen (apt-get install openssh-server)")
    with contextlib.ExitStack() as stack:
        def factory(num_hosts: int = 1, distinct_addresses: bool = False) -> list[SshdHandle]:
            root = tmp_path_factory.mktemp("sshd")
            return stack.enter_context(start_sshd_hosts(root, num_hosts, distinct_addresses))
        yield factory
