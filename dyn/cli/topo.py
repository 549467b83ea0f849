"""`dyn topo validate|show`: check a topology file and draw it."""

from __future__ import annotations

import typer
from rich.tree import Tree

from dyn.cli.render import errors_to_exit, out, print_json
from dyn.config.loader import load_topology, resolve_file
from dyn.config.ranges import compact_ranges
from dyn.config.topology import Topology
from dyn.topology.summary import summarize

topo_app = typer.Typer(help="Validate and show topology files (racks, nodes, GPUs, NVLink domains).",
                       no_args_is_help=True, epilog="Example: dyn topo show topologies/gb200-nvl72.yaml")

_PATH_HELP = "Topology YAML file, or a shipped name such as gb200-nvl72."


@topo_app.command("validate", epilog="Example: dyn topo validate topologies/gb200-nvl72.yaml --json")
def validate(path: str = typer.Argument(..., help=_PATH_HELP),
             as_json: bool = typer.Option(False, "--json", help="Print counts as JSON.")) -> None:
    """Check a topology file; exit 2 with file:line on the first problem."""
    with errors_to_exit():
        topology = load_topology(resolve_file("topology", path))
    summary = summarize(topology)
    if as_json:
        print_json(summary)
        return
    out().print(f"[green]ok[/] {summary['source']}: topology [bold]{summary['name']}[/], "
                f"{summary['racks']} rack(s), {summary['nodes']} node(s), {summary['gpus']} GPU(s), "
                f"{summary['nvlink_domains']} NVLink domain(s), head {summary['head']}")


@topo_app.command("show", epilog="Example: dyn topo show gb200-nvl72")
def show(path: str = typer.Argument(..., help=_PATH_HELP)) -> None:
    """Draw racks, trays, GPUs and NVLink domains as a tree."""
    with errors_to_exit():
        topology = load_topology(resolve_file("topology", path))
    out().print(_tree(topology))


@topo_app.command("from-slurm", epilog="Example (inside salloc): dyn topo from-slurm -o slurm.yaml "
                                       "--nvlink per-rack --nodes-per-rack 18")
def from_slurm(output: str = typer.Option("-", "-o", "--output", help="File to write ('-': stdout)."),
               name: str = typer.Option(None, "--name", help="Topology name (default: slurm-<job id>)."),
               gpu_model: str = typer.Option(None, "--gpu-model", help="GPU model (default: nvidia-smi on the "
                                                                       "first node)."),
               gpu_memory_gib: float = typer.Option(None, "--gpu-memory-gib", help="Memory per GPU."),
               nvlink: str = typer.Option("per-node", "--nvlink", help="per-node (HGX), per-rack (NVL72), none."),
               nodes_per_rack: int = typer.Option(None, "--nodes-per-rack", min=1,
                                                  help="Split the nodes into racks of this size (18 for NVL72 "
                                                       "trays); default: one rack.")) -> None:
    """Write a topology for the current Slurm allocation (`launch: slurm`, one node per Slurm node,
    GPUs per node as allocated)."""
    import os

    from dyn.deploy.slurm import current_allocation, probe_gpu_model, topology_text

    with errors_to_exit():
        allocation = current_allocation(dict(os.environ))
        if gpu_model is None and any(n.num_gpus for n in allocation.nodes):
            probed = probe_gpu_model(allocation, dict(os.environ))
            if probed is not None:
                gpu_model, gpu_memory_gib = probed[0], gpu_memory_gib or probed[1]
        text = topology_text(allocation, name=name, gpu_model=gpu_model, gpu_memory_gib=gpu_memory_gib,
                             nvlink=nvlink, nodes_per_rack=nodes_per_rack)
    if output == "-":
        typer.echo(text, nl=False)
    else:
        with open(output, "w") as handle:
            handle.write(text)
        typer.echo(f"wrote {output}: {len(allocation.nodes)} node(s) of Slurm job {allocation.job_id}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(topo_app, name="topo")


def _tree(topology: Topology) -> Tree:
    root = Tree(f"[bold]{topology.name}[/]  ({topology.num_gpus} GPUs, head {topology.head})")
    racks = root.add("racks")
    for rack in topology.racks:
        branch = racks.add(f"[bold]{rack.name}[/]  {len(rack.node_names)} node(s)")
        for name in rack.node_names:
            node = topology.node(name)
            where = "local" if node.ssh.is_local else f"{node.ssh.user + '@' if node.ssh.user else ''}" \
                                                         f"{node.ssh.address}:{node.ssh.port}"
            head = " [yellow](head)[/]" if name == topology.head else ""
            extras = [f"{node.host_memory_gib:g} GiB host"] if node.host_memory_gib else []
            extras += [f"{node.cpus} cpus"] if node.cpus else []
            extras += [f"kv disk {node.kv_disk_path}"] if node.kv_disk_path else []
            leaf = branch.add(f"[cyan]{name}[/]{head}  {where}  " + "  ".join(extras))
            if node.is_cpu_only:
                leaf.add("[dim]no GPUs (CPU workers)[/]")
            for gpu in node.gpus:
                domain = topology.domain_of(name, gpu.index) or "no NVLink"
                leaf.add(f"gpu {gpu.index}: {gpu.model} {gpu.memory_gib:g} GiB  [magenta]{domain}[/]")
    domains = root.add("NVLink domains")
    if not topology.nvlink_domains:
        domains.add("[dim]none[/]")
    for domain in topology.nvlink_domains:
        by_node: dict[str, list[int]] = {}
        for node, idx in domain.members:
            by_node.setdefault(node, []).append(idx)
        span = ", ".join(f"{n}[{compact_ranges(ix)}]" for n, ix in by_node.items())
        domains.add(f"[magenta]{domain.name}[/]  {domain.num_gpus} GPUs: {span}")
    return root
