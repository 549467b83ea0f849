"""`dyn doctor` and `dyn topo from-slurm` through typer's CliRunner, the services patched out."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dyn.cli.main import app
from dyn.deploy import doctor
from dyn.deploy.doctor_checks import Finding

runner = CliRunner()


def test_doctor_table_and_exit_status(monkeypatch):
    findings = [Finding("tray01", "clock", "ok", "+0.01 s from the head"),
                Finding("tray02", "dyn version", "FAIL", "dyn 0.0.9, head runs 0.1.0", "pip install dyn==0.1.0"),
                Finding("tray02", "GPUs", "skipped", "skipped: no GPU")]
    monkeypatch.setattr(doctor, "run", lambda inputs: findings)
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    for text in ("tray02", "dyn 0.0.9, head runs 0.1.0", "pip install dyn==0.1.0", "skipped: no GPU",
                 "1 blocking failure"):
        assert text in result.stdout
    as_json = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    assert [f["blocking"] for f in as_json] == [False, True, False]
    monkeypatch.setattr(doctor, "run", lambda inputs: findings[:1])
    assert runner.invoke(app, ["doctor"]).exit_code == 0


def test_from_slurm_outside_an_allocation_says_so(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["topo", "from-slurm"])
    assert result.exit_code == 1 and "not inside a Slurm allocation" in result.output


def test_from_slurm_writes_the_allocation(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "tray[01-02]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setattr("dyn.deploy.slurm.subprocess.run", _no_scontrol)
    out = tmp_path / "t.yaml"
    result = runner.invoke(app, ["topo", "from-slurm", "-o", str(out), "--gpu-model", "GB200",
                                 "--gpu-memory-gib", "186", "--nvlink", "per-rack"])
    assert result.exit_code == 0, result.output
    validated = runner.invoke(app, ["topo", "validate", str(out), "--json"])
    summary = json.loads(validated.stdout)
    assert (summary["nodes"], summary["gpus"], summary["nvlink_domains"], summary["head"]) == (2, 8, 1, "tray01")


def _no_scontrol(*args, **kwargs):
    raise FileNotFoundError("scontrol")
