"""Recipes that grow with the topology: per-domain counts, per-domain planner bounds, placement."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dyn.config.loader import load_recipe, load_topology, parse_recipe, parse_topology
from dyn.config.scaling import domain_units, scale_to_topology
from dyn.errors import ConfigError
from dyn.topology.placement import FitError, place, place_one

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "recipes/llama-3.1-70b-nvl72.yaml"


@pytest.mark.parametrize("topology,racks", [("gb200-nvl72", 1), ("gb200-nvl72x4", 4), ("gb200-nvl72x100", 100)])
def test_shipped_llama_recipe_scales_with_the_racks(topology, racks):
    topo = load_topology(ROOT / f"topologies/{topology}.yaml")
    recipe = scale_to_topology(load_recipe(LLAMA), topo)
    assert recipe.group("prefill").replicas == 8 * racks and recipe.group("decode").replicas == 12 * racks
    planner = recipe.planner
    assert (planner.min_prefill, planner.max_prefill) == (4 * racks, 12 * racks)
    assert (planner.min_decode, planner.max_decode) == (8 * racks, 14 * racks)
    placement = place(topo, recipe)
    per_domain = Counter((w.nvlink_domain, w.role) for w in placement.workers)
    assert len({d for d, _ in per_domain}) == racks
    assert set(per_domain.values()) == {8, 12}  # every rack: 8 prefill and 12 decode
    assert len(placement.used_gpus()) == 64 * racks
    for w in placement.workers:  # no tensor-parallel group leaves its domain
        assert {topo.domain_of(n, i) for n, i in w.gpu_keys} == {w.nvlink_domain}
    assert len({w.id for w in placement.workers}) == len(placement.workers)


def test_the_100_rack_topology_has_the_size_it_claims():
    topo = load_topology(ROOT / "topologies/gb200-nvl72x100.yaml")
    assert (len(topo.racks), len(topo.nodes), topo.num_gpus, len(topo.nvlink_domains)) == (100, 1800, 7200, 100)
    assert all(d.num_gpus == 72 for d in topo.nvlink_domains)
    assert len({n.ssh.address for n in topo.nodes}) == 1800


def test_scaling_is_idempotent_and_refuses_another_topology():
    one, four = (load_topology(ROOT / f"topologies/{t}.yaml") for t in ("gb200-nvl72", "gb200-nvl72x4"))
    scaled = scale_to_topology(load_recipe(LLAMA), four)
    assert scale_to_topology(scaled, four) is scaled
    assert place(four, scaled) == place(four, load_recipe(LLAMA))
    with pytest.raises(ConfigError, match="already scaled"):
        scale_to_topology(scaled, one)


def test_place_one_keeps_the_per_domain_recipe_in_a_domain():
    topo = load_topology(ROOT / "topologies/gb200-nvl72x4.yaml")
    recipe = load_recipe(LLAMA)
    placement = place(topo, recipe)
    extra = place_one(topo, recipe, "prefill", placement)
    assert extra.id == "prefill-32" and extra.nvlink_domain in {d.name for d in topo.nvlink_domains}


def _topo(racks: int):
    body = "".join(f"  - {{name: r{r}, nodes: [{{name: 'n{r}-{{1..2}}', address: '10.0.{r}.{{1..2}}'}}]}}\n"
                   for r in range(racks))
    return parse_topology(f"name: t{racks}\nhead: n0-1\nnvlink: per-rack\ndefaults: {{gpus: 4, gpu_model: GB200, gpu_memory_gib: 186}}\nracks:\n{body}", "t.yaml")


RECIPE = """name: r
model: {path: /m, engine: mock}
mode: disaggregated
workers:
  prefill: {replicas_per_domain: 1, tp: 2}
  decode:
    replicas_per_rack: 2
    tp: 2
planner: {enabled: true, min_prefill_per_domain: 1, max_prefill_per_domain: 2, min_decode: 1, max_decode: 9}
"""


def test_per_domain_and_per_rack_counts_on_a_small_topology():
    topo = _topo(3)
    recipe = scale_to_topology(parse_recipe(RECIPE, "r.yaml"), topo)
    assert len(domain_units(topo)) == 3
    assert (recipe.group("prefill").replicas, recipe.group("decode").replicas) == (3, 6)
    assert (recipe.planner.min_prefill, recipe.planner.max_prefill, recipe.planner.max_decode) == (3, 6, 9)
    placement = place(topo, recipe)
    assert Counter((w.nvlink_domain, w.role) for w in placement.workers) == {
        (f"nvl-r{r}", role): n for r in range(3) for role, n in (("prefill", 1), ("decode", 2))}


@pytest.mark.parametrize("edit,line,needle", [
    (("replicas_per_domain: 1, tp: 2}", "replicas_per_domain: 1, replicas: 2, tp: 2}"), 5, "not several"),
    (("min_decode: 1,", "min_decode: 1, min_decode_per_domain: 1,"), 9, "not both"),
    (("max_prefill_per_domain: 2", "max_prefill_per_domain: 0"), 9, "below min_prefill_per_domain"),
    (("replicas_per_rack: 2", "replicas_per_rack: -1"), 7, "at least 1"),
    (("replicas_per_domain: 1, tp: 2}", "replicas_per_domain: 3, tp: 2}"), 5, "outside the planner"),
])
def test_bad_per_domain_fields_name_file_and_line(edit, line, needle):
    with pytest.raises(ConfigError) as err:
        parse_recipe(RECIPE.replace(*edit), "r.yaml")
    assert err.value.line == line and needle in str(err.value) and str(err.value).startswith(f"r.yaml:{line}:")


def test_scaled_counts_outside_absolute_bounds_name_the_line():
    # 6 decode per rack x 2 racks = 12 > max_decode 9: only known once the topology is.
    recipe = parse_recipe(RECIPE.replace("replicas_per_rack: 2", "replicas_per_rack: 6"), "r.yaml")
    with pytest.raises(ConfigError) as err:
        scale_to_topology(recipe, _topo(2))
    assert err.value.line == 7 and "12 decode replicas" in str(err.value) and "outside" in str(err.value)


def test_a_domain_too_small_for_its_per_domain_groups_is_a_fit_error_at_the_line():
    # Racks of 4 and 12 GPUs: 16 in all, enough for the total (2 x 2 + 2 x 3 x 2), not for rack a.
    topo = parse_topology("name: u\nhead: a1\nnvlink: per-rack\ndefaults: {gpus: 4, gpu_model: GB200, "
                          "gpu_memory_gib: 186}\nracks:\n  - {name: a, nodes: [{name: a1, address: 10.0.0.1}]}\n"
                          "  - {name: b, nodes: [{name: 'b{1..3}', address: '10.0.1.{1..3}'}]}\n", "u.yaml")
    recipe = parse_recipe(RECIPE.replace("replicas_per_rack: 2", "replicas_per_rack: 3").replace(
        "max_decode: 9", "max_decode: 99"), "r.yaml")
    with pytest.raises(FitError) as err:
        place(topo, recipe)
    assert err.value.path == "r.yaml" and err.value.line in (5, 7) and "nvl-a" in str(err.value)


def test_the_planner_and_dyn_plan_see_the_scaled_recipe():
    import json

    from typer.testing import CliRunner

    from dyn.cli.main import app
    from dyn.engine.profile import load_profile, profile_path
    from dyn.planner.slo_policy import slo_planner

    topo = load_topology(ROOT / "topologies/gb200-nvl72x4.yaml")
    recipe = load_recipe(LLAMA)  # unscaled: the planner scales it itself
    planner = slo_planner(recipe, topo, load_profile(profile_path(LLAMA), recipe))
    assert (planner.spec.min_prefill, planner.spec.max_decode) == (16, 56)
    result = CliRunner().invoke(app, ["plan", "-t", str(ROOT / "topologies/gb200-nvl72x100.yaml"),
                                      "-r", str(LLAMA), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert len(plan["workers"]) == 2000 and plan["num_gpus_used"] == 6400


def test_the_planners_scale_down_step_grows_with_the_domains():
    from dyn.engine.profile import load_profile, profile_path
    from dyn.planner.slo_policy import slo_planner

    recipe = load_recipe(LLAMA)
    profile = load_profile(profile_path(LLAMA), recipe)
    steps = [slo_planner(recipe, load_topology(ROOT / f"topologies/{t}.yaml"), profile).max_step_down
             for t in ("gb200-nvl72", "gb200-nvl72x4", "gb200-nvl72x100")]
    assert steps == [2, 8, 200]
    fixed = parse_recipe(RECIPE.replace("replicas_per_domain: 1, tp: 2}", "replicas: 2, tp: 2}").replace(
        "replicas_per_rack: 2", "replicas: 2").replace("min_prefill_per_domain: 1, max_prefill_per_domain: 2",
                                                       "min_prefill: 1, max_prefill: 4"), "r.yaml")
    assert slo_planner(fixed, _topo(3), profile).max_step_down == 2  # absolute counts: absolute step
