"""Recipes that grow with the topology: per-domain and per-rack counts multiplied out.

A recipe written for one NVL72 rack says `replicas_per_domain: 12` and
`planner.max_decode_per_domain: 14`; on a 100-rack topology that is 1,200
decode workers and a planner ceiling of 1,400. `scale_to_topology` does the
multiplication once, before placement and before the planner reads its
bounds; placement then puts exactly the per-domain count in every domain
(dyn.topology.placement), so each domain holds whole prefill/decode pairs.

Units: an NVLink domain; a GPU node with no NVLink peers is its own domain;
on a CPU-only topology every node is one. A rack is a topology rack.
"""

from __future__ import annotations

from dataclasses import replace

from dyn.config.recipe import PlannerSpec, Recipe, WorkerGroup
from dyn.config.topology import Topology
from dyn.errors import ConfigError

_BOUNDS = ("min_prefill", "max_prefill", "min_decode", "max_decode")


def domain_units(topology: Topology) -> list[str]:
    """Names of the placement units a per-domain count applies to, in topology order."""
    in_domain = {m for d in topology.nvlink_domains for m in d.members}
    units = [d.name for d in topology.nvlink_domains]
    for node in topology.nodes:
        if any((node.name, g.index) not in in_domain for g in node.gpus):
            units.append(node.name)
    if not units:
        units = [n.name for n in topology.nodes]
    return units


def rack_units(topology: Topology) -> list[str]:
    return [r.name for r in topology.racks]


def is_scaled(recipe: Recipe) -> bool:
    """Whether the recipe uses any per-domain or per-rack count."""
    return (any(g.replicas_per_domain is not None or g.replicas_per_rack is not None for g in recipe.workers)
            or any(getattr(recipe.planner, f"{b}_per_domain") is not None for b in _BOUNDS))


def scale_to_topology(recipe: Recipe, topology: Topology) -> Recipe:
    """The recipe with absolute counts for `topology` (unchanged when nothing is per-domain).

    Idempotent for the same topology; raises ConfigError (file:line) when the result is
    inconsistent, e.g. starting replicas outside the scaled planner bounds.
    """
    if recipe.scaled_for is not None:
        if recipe.scaled_for != topology.name:
            raise ConfigError(f"was already scaled for topology {recipe.scaled_for!r}, not {topology.name!r}",
                              path=recipe.source, field="workers")
        return recipe
    if not is_scaled(recipe):
        return recipe
    num_domains, num_racks = len(domain_units(topology)), len(rack_units(topology))
    groups = tuple(_scale_group(g, num_domains, num_racks) for g in recipe.workers)
    planner = _scale_planner(recipe.planner, num_domains)
    scaled = replace(recipe, workers=groups, planner=planner, scaled_for=topology.name)
    if planner.enabled:
        for role in ("prefill", "decode"):
            group = scaled.group(role)
            low, high = getattr(planner, f"min_{role}"), getattr(planner, f"max_{role}")
            if low > high:
                raise _error(recipe, f"planner.max_{role}_per_domain",
                             f"max_{role} {high} is below min_{role} {low} on {topology.name!r} "
                             f"({num_domains} domains)")
            if group and not low <= group.replicas <= high:
                key = _count_key(group)
                raise _error(recipe, f"workers.{role}.{key}",
                             f"{group.replicas} {role} replicas on {topology.name!r} ({num_domains} domains) "
                             f"is outside the planner's range {low}..{high}",
                             f"start inside planner.min_{role}..max_{role} (per domain: x{num_domains})")
    return scaled


def _scale_group(group: WorkerGroup, num_domains: int, num_racks: int) -> WorkerGroup:
    if group.replicas_per_domain is not None:
        return replace(group, replicas=group.replicas_per_domain * num_domains)
    if group.replicas_per_rack is not None:
        return replace(group, replicas=group.replicas_per_rack * num_racks)
    return group


def _scale_planner(spec: PlannerSpec, num_domains: int) -> PlannerSpec:
    values = {b: getattr(spec, f"{b}_per_domain") * num_domains for b in _BOUNDS
              if getattr(spec, f"{b}_per_domain") is not None}
    return replace(spec, **values)


def _count_key(group: WorkerGroup) -> str:
    if group.replicas_per_domain is not None:
        return "replicas_per_domain"
    return "replicas_per_rack" if group.replicas_per_rack is not None else "replicas"


def _error(recipe: Recipe, field: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(message, path=recipe.source, line=recipe.line_of(field), field=field, hint=hint)
