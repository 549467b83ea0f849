"""launch: reach nodes (asyncssh, or subprocesses for `address: local`), copy
files, start detached processes and signal them; preflight checks.

Modules: `runner` (the Runner protocol and its data), `commands` (the shell
snippets, as data), `shell` (Runner operations over `run`), `local`, `ssh`
(+ `known_hosts`), `pool` (fan-out with bounded concurrency), `preflight`.
"""
