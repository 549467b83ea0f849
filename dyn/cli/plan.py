"""`dyn plan`: show where every worker of a recipe would run on a topology."""

from __future__ import annotations

import typer
from rich.table import Table

from dyn.cli.render import errors_to_exit, out, print_json
from dyn.config.loader import load_recipe, load_topology, resolve_file
from dyn.config.ranges import compact_ranges
from dyn.config.scaling import scale_to_topology
from dyn.topology.frontends import place_frontends
from dyn.topology.placement import place


def plan(topology: str = typer.Option(None, "-t", "--topology",
                                      help="Topology YAML or shipped name (default: local)."),
         recipe: str = typer.Option(None, "-r", "--recipe",
                                    help="Recipe YAML or shipped name (default: smollm2-local)."),
         as_json: bool = typer.Option(False, "--json", help="Print the placement as JSON.")) -> None:
    """Place a recipe's workers on a topology's GPUs (no processes are started).

    Example: dyn plan -t topologies/gb200-nvl72.yaml -r recipes/llama-3.1-70b-nvl72.yaml --json
    """
    from dyn.dashboard.render import print_whole

    with errors_to_exit():
        topo = load_topology(resolve_file("topology", topology))
        rec = scale_to_topology(load_recipe(resolve_file("recipe", recipe)), topo)
        placement = place(topo, rec)
        frontends = place_frontends(topo, rec)
    used = len(placement.used_gpus())
    commands = _vllm_commands(topo, rec, placement) if rec.model.engine == "vllm" else {}
    if as_json:
        doc = {"topology": topo.name, "recipe": rec.name, "mode": rec.mode,
               "num_gpus": topo.num_gpus, "num_gpus_used": used, **placement.to_dict(),
               "frontends": [{"id": f.id, "node": f.node, "host": f.host, "port": rec.frontend.port}
                             for f in frontends]}
        if commands:
            doc["vllm"] = {wid: [{"node": c.node, "gpus": list(c.gpus), "argv": list(c.argv), "env": dict(c.env),
                                  "in_process": list(c.in_process)}
                                 for c in cmds] for wid, cmds in commands.items()}
        print_json(doc)
        return
    table = Table(title=f"{rec.name} on {topo.name}")
    for column in ("worker", "role", "node", "gpus", "nvlink domain", "cpu threads"):
        table.add_column(column)
    for w in placement.workers:
        if not w.gpus:
            gpus = "cpu"
        elif w.extra_nodes:
            gpus = " ".join(f"{n}:{compact_ranges(g)}" for n, g in w.shards)
        else:
            gpus = compact_ranges(w.gpus)
        table.add_row(w.id, w.role, w.node, gpus, w.nvlink_domain or "-",
                      str(w.cpu_threads) if w.cpu_threads else "-")
    console = out()
    print_whole(console, table)
    console.print(f"{len(placement.workers)} worker(s), {used} of {topo.num_gpus} GPUs, "
                  f"head (planner): {placement.head}; frontends: "
                  + ", ".join(f"{f.id}@{f.node}" for f in frontends))
    shown: set[str] = set()
    for wid, cmds in commands.items():  # one example per role: the rest differ only in GPUs
        role = wid.rsplit("-", 1)[0]
        if role in shown:
            continue
        shown.add(role)
        console.print(f"\n[bold]{wid}[/bold] (vLLM; every {role} worker alike, on its own GPUs):", highlight=False)
        for c in cmds:
            console.print(f"  {c.node}: {c.shell()}", highlight=False, soft_wrap=True)


def _vllm_commands(topo, rec, placement) -> dict:
    from dyn.engine.vllm_args import worker_commands  # no vLLM import: plans on any head node

    return {w.id: worker_commands(rec, topo, w, i) for i, w in enumerate(placement.workers)}


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
