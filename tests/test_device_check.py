"""scripts/device_check.sh --dry-run: the prepared GPU check lists its steps and runs nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_lists_every_step_within_eight_minutes():
    done = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert [s.split(" (")[0] for s in steps] == ["== environment", "== gpu tests", "== engine figures",
                                                 "== shuttle figures"]
    assert "-m gpu" in steps[1] and "device_figures.py engine" in steps[2]
    limits = [int(s.split("(limit ")[1].split(" s)")[0]) for s in steps]
    assert sum(limits) < 8 * 60
    assert "nothing was run" in done.stdout
