"""Which transport moves KV between two workers, and why: one path table for the live
system (`dyn status`, the decode worker's pull) and the simulator's hand-off cost.

The hop comes from the topology (placement's node and GPUs of both workers);
the transport is the fastest one the hop and the platform allow:

    hop            CUDA + fabric   CUDA + NIXL        CUDA only       CPU
    same_gpu       cuda_ipc        cuda_ipc           cuda_ipc        shm
    same_node      cuda_ipc        cuda_ipc           cuda_ipc        shm   (no shared domain: shm)
    nvlink_domain  cuda_ipc        nixl (UCX over     PathError:      -
    (other tray)   (fabric         multi-node         never TCP over
                   handles)        NVLink)            an NVLink domain
    cross_domain   nixl / tcp      nixl               tcp             nixl / tcp

`recipe.shuttle.transport` can force one; a forced transport that cannot
work for a pair (shm across hosts, cuda_ipc without CUDA) is a PathError
naming both workers, never a silent fallback. Forcing `tcp` is the only way
to run an NVLink-domain hop over TCP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from dyn.config.recipe import Transport
from dyn.config.topology import Topology
from dyn.shuttle.errors import PathError

TRANSPORTS: tuple[str, ...] = ("cuda_ipc", "shm", "tcp", "nixl")


class Endpoint(NamedTuple):
    """A worker's place: its node and the GPU indices it uses (empty on CPU)."""

    node: str
    gpus: tuple[int, ...] = ()


HOPS: tuple[str, ...] = ("same_gpu", "same_node", "nvlink_domain", "cross_domain")
"""Where two workers sit relative to each other, nearest first."""


class PathChoice(NamedTuple):
    transport: str
    """One of TRANSPORTS."""
    reason: str
    """Why, in words an operator reads in `dyn status`."""
    hop: str = ""
    """One of HOPS."""
    link: str = ""
    """What carries the bytes: "hbm", "nvlink", "host" (shared memory), "network"."""


@dataclass(frozen=True)
class LinkSpeeds:
    """Nominal one-way bandwidth per link, GB/s: the simulator's hand-off cost of a path."""

    hbm_gbps: float = 1500.0
    """A copy inside one GPU's HBM (read + write of ~3 TB/s)."""
    nvlink_gbps: float = 900.0
    """NVLink 4/5 per GPU (H100 HGX, GB200 NVL72 across trays through the NVSwitch trays)."""
    host_gbps: float = 10.0
    """Shared memory between two processes: two host memcpys (plus staging for GPU KV)."""
    network_gbps: float = 50.0
    """A 400G NIC with RDMA (NIXL/UCX)."""
    tcp_gbps: float = 2.0
    """TCP through the shuttle's sockets: kernel copies and checksums on both ends."""

    def of(self, choice: PathChoice) -> float:
        if choice.transport == "tcp":
            return self.tcp_gbps
        return {"hbm": self.hbm_gbps, "nvlink": self.nvlink_gbps, "host": self.host_gbps,
                "network": self.network_gbps}.get(choice.link, self.tcp_gbps)


def hop_of(topology: Topology, src: Endpoint, dst: Endpoint) -> tuple[str, str | None]:
    """(hop, shared NVLink domain or None) of two workers."""
    domain = _shared_domain(topology, src, dst)
    if src.node == dst.node:
        return ("same_gpu" if set(src.gpus) & set(dst.gpus) else "same_node"), domain
    return ("nvlink_domain" if domain is not None else "cross_domain"), domain


def choose_path(topology: Topology, src: Endpoint, dst: Endpoint, forced: Transport = "auto", *,
                cuda_available: bool, nixl_available: bool,
                fabric_available: bool = False) -> PathChoice:
    """Pick the transport for KV moving from worker `src` to worker `dst` (see the table above)."""
    for role, end in (("source", src), ("destination", dst)):
        _check_endpoint(topology, role, end)
    hop, domain = hop_of(topology, src, dst)
    gpu = cuda_available and bool(src.gpus) and bool(dst.gpus)
    if forced != "auto":
        choice = _forced(forced, src, dst, hop == "same_node" or hop == "same_gpu", domain, cuda_available,
                         nixl_available, fabric_available)
        return choice._replace(hop=hop, link=_link(choice.transport, hop, gpu))
    if hop == "same_gpu" and gpu:
        return PathChoice("cuda_ipc", f"both workers on GPU {sorted(set(src.gpus) & set(dst.gpus))} of "
                                      f"node {src.node!r}", hop, "hbm")
    if domain is not None and gpu:
        if hop == "same_node":
            return PathChoice("cuda_ipc", f"GPUs share NVLink domain {domain!r} on node {src.node!r}",
                              hop, "nvlink")
        if fabric_available:
            return PathChoice("cuda_ipc", f"trays {src.node!r} and {dst.node!r} share NVLink domain "
                                          f"{domain!r} (fabric handles)", hop, "nvlink")
        if nixl_available:
            return PathChoice("nixl", f"trays {src.node!r} and {dst.node!r} share NVLink domain {domain!r}: "
                                      f"NIXL/UCX over multi-node NVLink", hop, "nvlink")
        raise PathError(f"workers on {src.node!r} and {dst.node!r} share NVLink domain {domain!r}, but this "
                        f"platform has neither CUDA fabric handles nor NIXL: KV would cross the NVLink "
                        f"domain over TCP (install nixl-cu12 on every node, or set shuttle.transport: tcp "
                        f"to accept TCP)", src=src.node, dst=dst.node, transport="auto")
    if hop in ("same_gpu", "same_node"):
        why = ("no GPU" if not (src.gpus and dst.gpus) else "CUDA is not available" if not cuda_available
               else "no shared NVLink domain")
        return PathChoice("shm", f"same host {src.node!r} ({why})", hop, "host")
    hop_words = f"nodes {src.node!r} -> {dst.node!r} in different NVLink domains" if src.gpus and dst.gpus \
        else f"nodes {src.node!r} -> {dst.node!r}"
    if nixl_available:
        return PathChoice("nixl", f"{hop_words}: NIXL is installed", hop, "network")
    return PathChoice("tcp", f"{hop_words}: NIXL is not installed, using TCP", hop, "network")


def may_use_nixl(topology: Topology, forced: Transport = "auto", *, nixl_available: bool) -> bool:
    """Whether any two workers of `topology` could move KV over NIXL (by the table above: only
    between nodes, or when forced). A worker sets NIXL up before it is ready only then: the import
    and agent start take ~3 s that a first hand-off would otherwise wait for."""
    if not nixl_available:
        return False
    if forced != "auto":
        return forced == "nixl"
    return len(topology.nodes) > 1


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


def _link(transport: str, hop: str, gpu: bool) -> str:
    """What carries a forced transport's bytes on this hop."""
    if transport == "shm":
        return "host"
    if transport == "cuda_ipc":
        return "hbm" if hop == "same_gpu" else "nvlink"
    if transport == "nixl" and gpu and hop != "cross_domain":
        return "nvlink"
    return "network"
