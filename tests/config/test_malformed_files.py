"""Malformed topology and recipe files: each exits 2 through the CLI and names file:line.

Each case marks its offending line with `#!`; the test finds the expected
line number from the marker, so the cases stay readable and exact.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dyn.cli.main import app

TOPO_HEAD = """\
name: t
head: n1
racks:
  - name: r
    nodes:
"""

TOPO_CASES = {
    "yaml-syntax": ("name: t\nracks:\n  - name: r\n    nodes:\n      - name: n1\n        address: local\n"
                    "      gpus: 3 #!\n", "YAML syntax error"),
    "unclosed-quote": ('name: "t\nracks: [] #!\n', "YAML syntax error"),
    "unknown-top-key": ("name: t\nrackz: [] #!\n", "did you mean 'racks'"),
    "unknown-node-key": (TOPO_HEAD + "      - name: n1\n        adress: local #!\n", "did you mean 'address'"),
    "gpus-not-a-count": (TOPO_HEAD + "      - {name: n1, address: local, gpus: four} #!\n", "gpus must be a count"),
    "range-not-numeric": (TOPO_HEAD + "      - {name: 'n{a..c}', address: local} #!\n", "is not a range"),
    "range-descending": (TOPO_HEAD + "      - {name: 'n{9..1}', address: 'h{1..9}'} #!\n", "counts down"),
    "range-lengths": (TOPO_HEAD + "      - name: n{1..4}\n        address: 10.0.0.{1..3} #!\n",
                      "expands to 3 values but name gives 4"),
    "duplicate-node": (TOPO_HEAD + "      - {name: n1, address: a}\n      - {name: n1, address: b} #!\n",
                       "duplicate node name 'n1'"),
    "duplicate-address": (TOPO_HEAD + "      - {name: n1, address: 10.0.0.1}\n"
                          "      - {name: n2, address: 10.0.0.1} #!\n", "same address 10.0.0.1:22"),
    "missing-head": ("name: t #!\nracks:\n  - name: r\n    nodes:\n      - {name: 'n{1..2}', address: 'h{1..2}'}\n",
                     "missing head node"),
    "head-not-a-node": ("name: t\nhead: n3 #!\nracks:\n  - name: r\n    nodes:\n"
                        "      - {name: 'n{1..2}', address: 'h{1..2}'}\n", "valid nodes: n1, n2"),
    "gpus-without-model": (TOPO_HEAD + "      - {name: n1, address: h1, gpus: 8} #!\n", "need gpu_model"),
    "port-range": (TOPO_HEAD + "      - {name: n1, address: h1, port: 70000} #!\n", "port must be an integer 1-65535"),
    "duplicate-key": (TOPO_HEAD + "      - name: n1\n        address: h1\n        name: n2 #!\n", "duplicate key 'name'"),
    "nvlink-and-domains": ("name: t\nhead: n1\nnvlink: per-rack #!\nnvlink_domains: []\nracks:\n  - name: r\n"
                           "    nodes:\n      - {name: n1, address: local}\n", "cannot both be set"),
    "domain-unknown-node": ("name: t\nhead: n1\nracks:\n  - name: r\n    nodes:\n"
                            "      - {name: n1, address: h1, gpus: 2, gpu_model: X, gpu_memory_gib: 8}\n"
                            "nvlink_domains:\n  - name: d\n    nodes: [n1, n2] #!\n", "no node named 'n2'"),
    "top-level-list": ("- name: t #!\n", "top level must be a mapping"),
    "duplicate-rack": ("name: t\nhead: a\nracks:\n  - name: r\n    nodes: [{name: a, address: h1}]\n"
                       "  - name: r #!\n    nodes: [{name: b, address: h2}]\n", "duplicate rack name 'r'"),
    "bad-nvlink-mode": ("name: t\nnvlink: per-rak #!\nracks:\n  - name: r\n    nodes: [{name: a, address: h}]\n",
                        "did you mean 'per-rack'"),
}

RECIPE = """\
name: r
model:
  path: /models/m
  engine: torch
  block_size: 16
  max_context: 4096
mode: disaggregated
workers:
  prefill:
    replicas: 1
  decode:
    replicas: 1
    tp: 1
"""


def _recipe(old: str, new: str) -> str:
    assert old in RECIPE
    return RECIPE.replace(old, new, 1)


RECIPE_CASES = {
    "unknown-group-key": (_recipe("    replicas: 1\n  decode", "    replica: 1 #!\n  decode"), "did you mean 'replicas'"),
    "bad-mode": (_recipe("mode: disaggregated", "mode: disagg #!"), "must be aggregated or disaggregated"),
    "bad-engine": (_recipe("engine: torch", "engine: pytorch #!"), "did you mean 'torch'"),
    "tp-string": (_recipe("    tp: 1", "    tp: '2' #!"), "expected an integer"),
    "replicas-bool": (_recipe("    replicas: 1\n  decode", "    replicas: yes #!\n  decode"), "expected an integer"),
    "missing-path": (_recipe("  path: /models/m\n", "").replace("model:", "model: #!"), "missing required key 'path'"),
    "role-wrong-mode": (_recipe("mode: disaggregated", "mode: aggregated").replace("  prefill:", "  prefill: #!"),
                        "does not belong in mode aggregated"),
    "block-over-context": (_recipe("block_size: 16", "block_size: 8192 #!"), "exceeds max_context"),
    "planner-min-over-max": (RECIPE + "planner:\n  min_decode: 4\n  max_decode: 2 #!\n", "is below min_decode"),
    "credit-over-one": (RECIPE + "router:\n  host_hit_credit: 1.5 #!\n", "between 0 and 1"),
    "negative-replicas": (_recipe("    replicas: 1\n    tp", "    replicas: -1 #!\n    tp"), "must be at least 1"),
    "unknown-section": (RECIPE + "plannr: {} #!\n", "did you mean 'planner'"),
    "tp-on-cpu": (_recipe("    tp: 1", "    tp: 2 #!"), "needs GPUs"),
}

GPU_TOPOLOGY = """\
name: two-hgx
head: h1
nvlink: per-node
defaults: {gpus: 8, gpu_model: H100-80GB, gpu_memory_gib: 80}
racks:
  - name: r
    nodes:
      - {name: 'h{1..2}', address: '10.0.0.{1..2}'}
"""

FIT_CASES = {
    "tp-larger-than-domain": (_recipe("    tp: 1", "    tp: 16 #!"), "largest NVLink domain"),
    "more-workers-than-gpus": (_recipe("workers:", "workers: #!").replace("    replicas: 1\n    tp", "    replicas: 20\n    tp"),
                               "needs 21 GPUs"),
}


def _marked_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "#!" in line)


def _check(result, path: Path, text: str, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"{path}:{_marked_line(text)}:" in result.output
    assert needle in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(TOPO_CASES))
def test_bad_topology_exits_2_with_file_and_line(case: str, tmp_path: Path) -> None:
    text, needle = TOPO_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    _check(CliRunner().invoke(app, ["topo", "validate", str(path)]), path, text, needle)


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_exits_2_with_file_and_line(case: str, tmp_path: Path) -> None:
    text, needle = RECIPE_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    _check(CliRunner().invoke(app, ["plan", "-t", "local", "-r", str(path)]), path, text, needle)


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_recipe_that_does_not_fit_names_recipe_line(case: str, tmp_path: Path) -> None:
    text, needle = FIT_CASES[case]
    topo, path = tmp_path / "topo.yaml", tmp_path / f"{case}.yaml"
    topo.write_text(GPU_TOPOLOGY)
    path.write_text(text)
    _check(CliRunner().invoke(app, ["plan", "-t", str(topo), "-r", str(path)]), path, text, needle)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    result = CliRunner().invoke(app, ["topo", "validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1: the file is empty" in result.output


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["topo", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_cases_are_dedented_yaml() -> None:
    assert len(TOPO_CASES) + len(RECIPE_CASES) + len(FIT_CASES) >= 30
    assert textwrap.dedent(RECIPE) == RECIPE
