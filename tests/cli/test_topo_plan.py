"""`dyn topo validate|show` and `dyn plan` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dyn import __version__
from dyn.cli.main import app
from dyn.config.ranges import compact_ranges

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_version() -> None:
    result = _run("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command", [["topo"], ["topo", "validate"], ["topo", "show"], ["plan"]])
def test_help_has_an_example(command: list[str]) -> None:
    result = _run(*command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout


def test_validate_nvl72_json() -> None:
    result = _run("topo", "validate", str(ROOT / "topologies/gb200-nvl72.yaml"), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert (data["racks"], data["nodes"], data["gpus"], data["nvlink_domains"]) == (1, 18, 72, 1)
    assert data["domains"][0]["nodes"][-1] == "tray18"


def test_validate_human_summary() -> None:
    result = _run("topo", "validate", "gb200-nvl72x4")
    assert result.exit_code == 0
    assert "4 rack(s), 72 node(s), 288 GPU(s), 4 NVLink domain(s)" in result.stdout


def test_show_draws_trays_gpus_and_domains() -> None:
    result = _run("topo", "show", "gb200-nvl72")
    assert result.exit_code == 0
    out = result.stdout
    assert "tray18" in out and "gpu 3: GB200 186 GiB" in out
    assert "nvl-nvl72-a  72 GPUs" in out and "(head)" in out


def test_plan_70b_json_places_every_worker_once_inside_the_domain() -> None:
    result = _run("plan", "-t", str(ROOT / "topologies/gb200-nvl72.yaml"),
                  "-r", str(ROOT / "recipes/llama-3.1-70b-nvl72.yaml"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["head"] == "tray01" and len(data["workers"]) == 20
    seen = set()
    for w in data["workers"]:
        assert set(w) >= {"id", "role", "node", "gpus", "nvlink_domain"}
        assert w["nvlink_domain"] == "nvl-nvl72-a"
        for shard in [{"node": w["node"], "gpus": w["gpus"]}, *w["extra_nodes"]]:
            for gpu in shard["gpus"]:
                assert (shard["node"], gpu) not in seen
                seen.add((shard["node"], gpu))
    assert len(seen) == data["num_gpus_used"] == 64


def test_plan_defaults_to_local_smollm2_and_prints_a_table() -> None:
    result = _run("plan")
    assert result.exit_code == 0, result.output
    assert "smollm2-local on local" in result.stdout
    assert "prefill-0" in result.stdout and "decode-0" in result.stdout
    assert "head (planner): local; frontends: frontend@local" in result.stdout


def test_plan_table_shows_multi_tray_groups() -> None:
    result = _run("plan", "-t", "gb200-nvl72", "-r", "deepseek-r1-nvl72")
    assert result.exit_code == 0
    assert "tray01:0-3 tray02:0-3 tray03:0-3 tray04:0-3" in result.stdout


def test_yaml_syntax_error_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nracks:\n  - name: r\n   nodes: []\n")
    result = _run("topo", "validate", str(bad))
    assert result.exit_code == 2
    assert f"{bad}:4: YAML syntax error" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_tp_larger_than_any_domain_exits_2(tmp_path: Path) -> None:
    recipe = tmp_path / "wide.yaml"
    recipe.write_text((ROOT / "recipes/llama-3.1-8b-hgx.yaml").read_text().replace(
        "    replicas: 8\n", "    replicas: 4\n    tp: 16\n"))
    result = _run("plan", "-t", "hgx-h100x8", "-r", str(recipe))
    assert result.exit_code == 2
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "tp: 16" in text)
    assert f"{recipe}:{line}: workers.decode.tp: tp=16 does not fit" in result.stderr
    assert "use tp <= 8" in result.stderr


def test_compact_ranges() -> None:
    assert compact_ranges([3, 0, 1, 2, 6, 8, 9]) == "0-3,6,8-9"
    assert compact_ranges([]) == ""
