"""Every command's errors come out one way: `error: <message>` on stderr, the error's exit code."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dyn.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("args, code, needle", [
    (["status", "--name", "no-such-deployment"], 1, "no deployment named 'no-such-deployment'"),
    (["logs", "--name", "no-such-deployment", "decode-0"], 1, "no deployment named"),
    (["logs"], 2, "give a process id"),
    (["logs", "decode-0", "--request", "r1"], 2, "--request reads every process's log"),
    (["model", "init", "huge", "somewhere"], 2, "unknown model kind 'huge'"),
    (["sim", "-t", "no-such-topology.yaml", "-r", "no-such-recipe.yaml", "--trace", "none.jsonl"], 2, "topology"),
])
def test_errors_render_through_one_helper(tmp_path, args, code, needle):
    result = runner.invoke(app, args, env={"DYN_STATE_DIR": str(tmp_path), "COLUMNS": "300"})
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert "Traceback" not in result.output and not result.stdout
