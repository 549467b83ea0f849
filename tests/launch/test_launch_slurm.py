"""SlurmRunner's commands as data (the live behaviour: tests/e2e/test_slurm.py)."""

from __future__ import annotations

import pytest

from dyn.errors import LaunchError
from dyn.launch.slurm import srun_argv, srun_env, step_visible_devices


def test_srun_argv_pins_one_task_to_the_node():
    argv = srun_argv("12", "gpu07", ["dyn", "worker"], name="dyn:x:1", output="/r/50%.log", chdir="/r")
    assert argv[:6] == ("srun", "--jobid=12", "--overlap", "--nodelist=gpu07", "--nodes=1", "--ntasks=1")
    assert "--output=/r/50%%.log" in argv and "--chdir=/r" in argv and "--job-name=dyn:x:1" in argv
    assert argv[-3:] == ("--", "dyn", "worker") and not any(a.startswith("--gres") for a in argv)
    assert "--gres=gpu:4" in srun_argv("12", "gpu07", ["true"], num_gpus=4)


def test_srun_env_drops_the_allocations_option_defaults():
    env = srun_env({"PATH": "/bin", "SLURM_NTASKS": "8", "SLURM_CONF": "/c", "SLURM_JOB_ID": "3"})
    assert env == {"PATH": "/bin", "SLURM_CONF": "/c"}


def test_gpu_pinning_inside_a_step():
    in_step = {"SLURM_STEP_ID": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert step_visible_devices([1, 2], in_step) == "5,6"
    assert step_visible_devices([1, 2], {}) == "1,2"
    assert step_visible_devices([], in_step) is None
    with pytest.raises(LaunchError, match="sees only 4,5,6,7"):
        step_visible_devices([4], in_step)


def test_step_prefixes_of_two_deployments_never_overlap():
    from dyn.launch.slurm import step_prefix

    a, b = step_prefix("llama"), step_prefix("llama-2")
    assert a == "dyn:llama:" and not b.startswith(a) and not a.startswith(b)
