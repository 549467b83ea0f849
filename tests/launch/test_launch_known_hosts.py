"""known_hosts lookups and accept-new recording, on real key material."""

from __future__ import annotations

import asyncssh
import pytest

from dyn.config.topology import SshTarget
from dyn.launch import known_hosts
from dyn.launch.ssh import SshOptions


def test_record_then_match_with_and_without_port(tmp_path) -> None:
    path = str(tmp_path / "ssh" / "known_hosts")
    key = asyncssh.generate_private_key("ssh-ed25519")
    assert not known_hosts.has_entry(known_hosts.load(path), "10.0.0.5", 2222)
    line = known_hosts.record(path, "10.0.0.5", 2222, key)
    assert line.startswith("[10.0.0.5]:2222 ssh-ed25519 ")
    assert known_hosts.record(path, "10.0.0.5", 2222, key) == line  # not duplicated
    known_hosts.record(path, "tray3", 22, key)
    text = (tmp_path / "ssh" / "known_hosts").read_text()
    assert text.splitlines() == [line, line.replace("[10.0.0.5]:2222", "tray3")]
    known = known_hosts.load(path)
    assert known_hosts.has_entry(known, "10.0.0.5", 2222)
    assert known_hosts.has_entry(known, "tray3", 22)
    assert not known_hosts.has_entry(known, "10.0.0.6", 2222)
    assert (tmp_path / "ssh").stat().st_mode & 0o777 == 0o700


def test_record_after_a_file_without_trailing_newline(tmp_path) -> None:
    path = tmp_path / "kh"
    path.write_text("# operator notes")
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = known_hosts.record(str(path), "h", 22, key)
    assert path.read_text() == f"# operator notes\n{line}\n"


def test_default_path_and_options_validation(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert known_hosts.known_hosts_path(SshTarget("h")) == f"{tmp_path}/.ssh/known_hosts"
    assert known_hosts.known_hosts_path(SshTarget("h", known_hosts="/etc/kh")) == "/etc/kh"
    with pytest.raises(ValueError, match="retries must be >= 0, got -1"):
        SshOptions(retries=-1)
    with pytest.raises(ValueError, match="connect_timeout_s must be > 0"):
        SshOptions(connect_timeout_s=0)
