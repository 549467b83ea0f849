"""deploy: the operator-side library behind `dyn up/down/status/ls/logs` and `dyn top` (the daemon is in planner);
Slurm allocations (`slurm`, `slurm_map`, `hostlist`), `dyn doctor` (`doctor`, `doctor_checks`, `doctor_probe`)
and `dyn up --wait` (`hold`)."""
