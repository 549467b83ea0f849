"""`dyn plan`: show where every worker of a recipe would run on a topology."""

from __future__ import annotations

import typer
from rich.table import Table

from dyn.cli.render import errors_to_exit, out, print_json
from dyn.config.loader import load_recipe, load_topology, resolve_file
from dyn.config.ranges import compact_ranges
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
    with errors_to_exit():
        topo = load_topology(resolve_file("topology", topology))
        rec = load_recipe(resolve_file("recipe", recipe))
        placement = place(topo, rec)
        frontends = place_frontends(topo, rec)
    used = len(placement.used_gpus())
    if as_json:
        print_json({"topology": topo.name, "recipe": rec.name, "mode": rec.mode,
                    "num_gpus": topo.num_gpus, "num_gpus_used": used, **placement.to_dict(),
                    "frontends": [{"id": f.id, "node": f.node, "host": f.host, "port": rec.frontend.port}
                                  for f in frontends]})
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
    console.print(table)
    console.print(f"{len(placement.workers)} worker(s), {used} of {topo.num_gpus} GPUs, "
                  f"head (planner): {placement.head}; frontends: "
                  + ", ".join(f"{f.id}@{f.node}" for f in frontends))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
