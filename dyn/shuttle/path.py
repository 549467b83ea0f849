"""Which transport moves KV between two workers, and why.

The rule, fastest first (DESIGN "Shuttle path"):

    same node, GPUs in one NVLink domain, CUDA up   -> cuda_ipc
    other trays of one NVLink domain (NVL72)         -> cuda_ipc over fabric
                                                        handles when the platform
                                                        has them, else as below
    same node                                        -> shm
    other nodes                                      -> nixl if importable, else tcp

`recipe.shuttle.transport` can force one; a forced transport that cannot
work for a pair (shm across hosts, cuda_ipc without CUDA) is a PathError
naming both workers, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from dyn.config.recipe import Transport
from dyn.config.topology import Topology
from dyn.shuttle.errors import PathError

TRANSPORTS: tuple[str, ...] = ("cuda_ipc", "shm", "tcp", "nixl")


class Endpoint(NamedTuple):
    """A worker's place: its node and the GPU indices it uses (empty on CPU)."""

    node: str
    gpus: tuple[int, ...] = ()


class PathChoice(NamedTuple):
    transport: str
    """One of TRANSPORTS."""
    reason: str
    """Why, in words an operator reads in `dyn status`."""


def choose_path(topology: Topology, src: Endpoint, dst: Endpoint, forced: Transport = "auto", *,
                cuda_available: bool, nixl_available: bool,
                fabric_available: bool = False) -> PathChoice:
    """Pick the transport for KV moving from worker `src` to worker `dst`."""
    for role, end in (("source", src), ("destination", dst)):
        _check_endpoint(topology, role, end)
    same_node = src.node == dst.node
    domain = _shared_domain(topology, src, dst)
    if forced != "auto":
        return _forced(forced, src, dst, same_node, domain, cuda_available, nixl_available,
                       fabric_available)
    if domain is not None and cuda_available:
        if same_node:
            return PathChoice("cuda_ipc", f"GPUs share NVLink domain {domain!r} on node {src.node!r}")
        if fabric_available:
            return PathChoice("cuda_ipc", f"trays {src.node!r} and {dst.node!r} share NVLink domain "
                                          f"{domain!r} (fabric handles)")
    if same_node:
        why = ("no shared NVLink domain" if domain is None else "CUDA is not available")
        return PathChoice("shm", f"same host {src.node!r} ({why})")
    hop = f"nodes {src.node!r} -> {dst.node!r}"
    if domain is not None and cuda_available:
        hop += f" (NVLink domain {domain!r}, but no fabric handles on this platform)"
    if nixl_available:
        return PathChoice("nixl", f"{hop}: NIXL is installed")
    return PathChoice("tcp", f"{hop}: NIXL is not installed, using TCP")


def plan_paths(topology: Topology, prefill: Mapping[str, Endpoint], decode: Mapping[str, Endpoint],
               forced: Transport = "auto", *, cuda_available: bool, nixl_available: bool,
               fabric_available: bool = False) -> dict[tuple[str, str], PathChoice]:
    """The path of every (prefill worker, decode worker) pair, keyed by worker ids, for `dyn status`."""
    return {(p_id, d_id): choose_path(topology, p_end, d_end, forced, cuda_available=cuda_available,
                                      nixl_available=nixl_available, fabric_available=fabric_available)
            for p_id, p_end in prefill.items() for d_id, d_end in decode.items()}


def _forced(forced: str, src: Endpoint, dst: Endpoint, same_node: bool, domain: str | None,
            cuda_available: bool, nixl_available: bool, fabric_available: bool) -> PathChoice:
    why = f"forced by recipe shuttle.transport={forced!r}"
    pair = f"{src.node!r} -> {dst.node!r}"

    def fail(problem: str, hint: str) -> PathError:
        return PathError(f"shuttle.transport={forced!r} cannot connect {pair}: {problem} ({hint})",
                         src=src.node, dst=dst.node, transport=forced)

    if forced not in TRANSPORTS:
        raise fail("unknown transport", f"use one of auto, {', '.join(TRANSPORTS)}")
    if forced == "shm" and not same_node:
        raise fail("shared memory needs both workers on one host", "use tcp or auto")
    if forced == "cuda_ipc":
        if not cuda_available:
            raise fail("CUDA is not available", "use shm or auto on CPU nodes")
        if not src.gpus or not dst.gpus:
            raise fail("a worker has no GPU", "use shm or auto")
        if not same_node and not (domain is not None and fabric_available):
            raise fail("workers are on different hosts without fabric handles", "use nixl, tcp or auto")
    if forced == "nixl" and not nixl_available:
        raise fail("the nixl package is not importable", "install the nixl extra or use tcp")
    return PathChoice(forced, why)


def _shared_domain(topology: Topology, src: Endpoint, dst: Endpoint) -> str | None:
    """The one NVLink domain holding every GPU of both workers, if any."""
    if not src.gpus or not dst.gpus:
        return None
    domains = {topology.domain_of(src.node, g) for g in src.gpus}
    domains |= {topology.domain_of(dst.node, g) for g in dst.gpus}
    if len(domains) != 1:
        return None
    return domains.pop()


def _check_endpoint(topology: Topology, role: str, end: Endpoint) -> None:
    source = f" in {topology.source}" if topology.source else ""
    try:
        node = topology.node(end.node)
    except KeyError:
        known = ", ".join(n.name for n in topology.nodes)
        raise PathError(f"{role} node {end.node!r} is not in topology {topology.name!r}{source} "
                        f"(nodes: {known})", src=end.node if role == "source" else None,
                        dst=end.node if role == "destination" else None) from None
    have = {g.index for g in node.gpus}
    missing = sorted(set(end.gpus) - have)
    if missing:
        raise PathError(f"{role} node {end.node!r} has no GPU {missing}{source} "
                        f"(it has {sorted(have) or 'none'})")
