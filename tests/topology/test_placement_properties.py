"""Property tests: random topologies (written as YAML) and recipes.

Whatever the shapes, a placement never double-books a GPU, never lets a
tensor-parallel group leave its NVLink domain (or its node, without one),
and is a pure function of its inputs. A recipe of TP1 workers that needs no
more GPUs than exist always fits.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dyn.config.loader import parse_recipe, parse_topology
from dyn.topology.placement import FitError, place, place_one


@st.composite
def topologies(draw) -> str:
    mode = draw(st.sampled_from(["per-node", "per-rack", "none"]))
    lines = ["name: rand", "head: r0n0", f"nvlink: {mode}",
             "defaults: {gpu_model: H100, gpu_memory_gib: 80}", "racks:"]
    for r in range(draw(st.integers(1, 3))):
        lines += [f"  - name: r{r}", "    nodes:"]
        for n in range(draw(st.integers(1, 4))):
            gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
            lines.append(f"      - {{name: r{r}n{n}, address: 10.{r}.0.{n + 1}, gpus: {gpus}}}")
    return "\n".join(lines) + "\n"


@st.composite
def recipes(draw, tp_choices=(1, 2, 4, 8)) -> str:
    prefill = draw(st.integers(0, 4))
    decode = draw(st.integers(1, 4))
    return ("name: rand\nmodel: {path: /m, device: auto}\nmode: disaggregated\nworkers:\n"
            f"  prefill: {{replicas: {prefill}, tp: {draw(st.sampled_from(tp_choices))}}}\n"
            f"  decode: {{replicas: {decode}, tp: {draw(st.sampled_from(tp_choices))}}}\n")


def _check_sound(topo, placement) -> None:
    keys = [k for w in placement.workers for k in w.gpu_keys]
    assert len(keys) == len(set(keys))
    for w in placement.workers:
        domains = {topo.domain_of(node, idx) for node, idx in w.gpu_keys}
        if topo.num_gpus:
            assert domains == {w.nvlink_domain}
            if w.nvlink_domain is None:
                assert not w.extra_nodes  # without NVLink a group never leaves its node
        for node, idx in w.gpu_keys:
            assert idx in {g.index for g in topo.node(node).gpus}


@settings(max_examples=150, deadline=None)
@given(topologies(), recipes())
def test_no_double_booking_and_tp_inside_one_domain(topo_text: str, recipe_text: str) -> None:
    topo, recipe = parse_topology(topo_text, "t"), parse_recipe(recipe_text, "r")
    try:
        placement = place(topo, recipe)
    except FitError:
        return
    _check_sound(topo, placement)
    expected = sum(g.replicas for g in recipe.workers)
    assert len(placement.workers) == expected
    if topo.num_gpus:
        assert len(placement.used_gpus()) == sum(g.replicas * g.tp for g in recipe.workers)
    assert placement == place(parse_topology(topo_text, "t"), parse_recipe(recipe_text, "r"))


@settings(max_examples=100, deadline=None)
@given(topologies(), recipes(tp_choices=(1,)))
def test_tp1_always_fits_when_gpus_suffice(topo_text: str, recipe_text: str) -> None:
    topo, recipe = parse_topology(topo_text, "t"), parse_recipe(recipe_text, "r")
    need = sum(g.replicas for g in recipe.workers)
    if topo.num_gpus and need > topo.num_gpus:
        try:
            place(topo, recipe)
        except FitError as exc:
            assert exc.shortfall_gpus == need - topo.num_gpus
            return
        raise AssertionError("placement should have failed")
    placement = place(topo, recipe)
    _check_sound(topo, placement)


@settings(max_examples=80, deadline=None)
@given(topologies(), recipes(), st.sampled_from(["prefill", "decode"]))
def test_place_one_never_reuses_a_gpu(topo_text: str, recipe_text: str, role: str) -> None:
    topo, recipe = parse_topology(topo_text, "t"), parse_recipe(recipe_text, "r")
    try:
        placement = place(topo, recipe)
        extra = place_one(topo, recipe, role, placement)
    except FitError:
        return
    assert extra.id not in {w.id for w in placement.workers}
    assert not set(extra.gpu_keys) & placement.used_gpus()
