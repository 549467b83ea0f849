"""launch: reach nodes (asyncssh, subprocesses for `address: local`, or Slurm job steps), copy
files, start detached processes and signal them; preflight checks.

Modules: `runner` (the Runner protocol and its data), `commands` (the shell
snippets, as data), `shell` (Runner operations over `run`), `local`, `ssh`
(+ `known_hosts`), `slurm` (srun steps in an allocation), `pool` (fan-out with
bounded concurrency), `preflight`.
"""
