"""Put a rack topology (trays, GPUs, NVLink domains) onto the nodes of a Slurm allocation.

`dyn up --slurm -t gb200-nvl72` on an 18-node allocation: the topology's
nodes are named and addressed for SSH (tray01 at 10.0.0.11 ...) while Slurm
hands out `gb200-r3-[01-18]`. The topology's nodes are taken in file order
(racks, then trays) and given the allocation's nodes in Slurm's order; every
other fact of a tray (GPUs, model, memory, KV disk, NICs) and the NVLink
domains (as explicit `nvlink_domains`, so a domain keeps exactly its trays)
carry over. The result is a topology file text with `launch: slurm`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from dyn.errors import DeploymentError

if TYPE_CHECKING:
    from dyn.config.topology import Node, Topology
    from dyn.deploy.slurm import Allocation


def map_onto_allocation(topology: "Topology", allocation: "Allocation", source: str,
                        this_host: str | None = None) -> str:
    """Topology text for `allocation`: node i of the file runs on allocation node i, except that
    the head gets `this_host` (the allocation node `dyn up` runs on, where the daemon must live)."""
    if len(topology.nodes) > len(allocation.nodes):
        raise DeploymentError(f"{source} has {len(topology.nodes)} nodes but Slurm job {allocation.job_id} holds "
                              f"{len(allocation.nodes)} ({', '.join(allocation.hostnames[:6])}...): ask salloc "
                              f"for -N {len(topology.nodes)}, or use `dyn topo from-slurm`")
    hosts = list(allocation.nodes[:len(topology.nodes)])
    here = next((i for i, n in enumerate(allocation.nodes) if n.hostname == this_host), None)
    if here is not None:
        head_idx = [n.name for n in topology.nodes].index(topology.head)
        if here < len(hosts):
            hosts[head_idx], hosts[here] = hosts[here], hosts[head_idx]
        else:
            hosts[head_idx] = allocation.nodes[here]
    slurm_of = dict(zip((n.name for n in topology.nodes), hosts))
    for node in topology.nodes:
        have = slurm_of[node.name].num_gpus
        if have and len(node.gpus) > have:
            raise DeploymentError(f"{source}: {node.name} uses {len(node.gpus)} GPUs but Slurm gives "
                                  f"{slurm_of[node.name].hostname} {have}; ask salloc for "
                                  f"--gpus-per-node={len(node.gpus)}")
    lines = [f"# {source} mapped onto Slurm job {allocation.job_id} by `dyn up --slurm`",
             f"name: {topology.name}", "launch: slurm", f'slurm_job: "{allocation.job_id}"',
             f"head: {topology.head}", "racks:"]
    for rack in topology.racks:
        lines += [f"  - name: {rack.name}", "    nodes:"]
        lines += [f"      - {_node_entry(topology.node(name), slurm_of[name])}" for name in rack.node_names]
    if topology.nvlink_domains:
        lines.append("nvlink_domains:")
        for domain in topology.nvlink_domains:
            nodes = list(dict.fromkeys(member[0] for member in domain.members))
            lines.append(f"  - {{name: {domain.name}, nodes: {json.dumps(nodes)}}}")
    else:
        lines.append("nvlink: none")
    return "\n".join(lines) + "\n"


def _node_entry(node: "Node", slurm_node) -> str:
    fields: dict[str, object] = {"name": node.name, "address": slurm_node.hostname}
    if node.gpus:
        fields.update(gpus=[g.index for g in node.gpus], gpu_model=node.gpus[0].model,
                      gpu_memory_gib=node.gpus[0].memory_gib)
    if node.host_memory_gib:
        fields["host_memory_gib"] = node.host_memory_gib
    if node.kv_disk_path:
        fields["kv_disk_path"] = node.kv_disk_path
    if node.nics:
        fields["nics"] = list(node.nics)
    cpus = node.cpus or slurm_node.num_cpus
    if cpus:
        fields["cpus"] = cpus
    if slurm_node.address:
        fields["bind_address"] = slurm_node.address
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"
