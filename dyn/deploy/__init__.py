"""deploy: the operator-side library behind `dyn up/down/status/ls/logs` and `dyn top` (the daemon is in planner)."""
