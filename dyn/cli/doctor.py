"""`dyn doctor`: preflight every node of a topology and print one table of findings."""

from __future__ import annotations

import shlex
from typing import Optional

import typer


def doctor(
    topology: Optional[str] = typer.Option(None, "-t", "--topology", help="Topology file or shipped name "
                                           "(default: local; with --slurm: the current allocation)."),
    recipe: Optional[str] = typer.Option(None, "-r", "--recipe", help="Recipe: adds its model files and "
                                         "frontend port to the checks."),
    slurm: bool = typer.Option(False, "--slurm", help="Probe the nodes of the current Slurm allocation "
                                                      "through job steps."),
    dyn_command: Optional[str] = typer.Option(None, "--dyn-command", help="How dyn runs on remote nodes "
                                                                         "(default: `dyn`)."),
    accept_new_host_keys: bool = typer.Option(False, "--accept-new-host-keys",
                                              help="Trust and record unknown SSH host keys."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Check every node before `dyn up`: reachability, clock skew, Python/dyn version, GPUs, driver,
    NVLink and fabric/IMEX, GPU memory, ECC/Xid, clocks, disk, ports, model files. Exits 1 on a
    blocking failure (FAIL).

    Example: dyn doctor -t topologies/gb200-nvl72.yaml -r recipes/llama-3.1-70b-nvl72.yaml
    """
    from dyn.cli.render import errors_to_exit, out, print_json
    from dyn.dashboard.render import print_whole
    from dyn.deploy.doctor import doctor_inputs, has_blocking, run

    with errors_to_exit():
        inputs = doctor_inputs(topology, recipe, slurm=slurm,
                               dyn_command=tuple(shlex.split(dyn_command)) if dyn_command else None,
                               accept_new_host_keys=accept_new_host_keys)
        findings = run(inputs)
    if as_json:
        print_json([f.__dict__ | {"blocking": f.is_blocking} for f in findings])
    else:
        print_whole(out(), findings_table(findings))
    if has_blocking(findings):
        raise typer.Exit(1)


def findings_table(findings):
    from rich.table import Table

    colours = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "skipped": "dim"}
    table = Table(title="dyn doctor", show_lines=False)
    for column in ("node", "check", "result", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f.node, f.check, f"[{colours.get(f.result, '')}]{f.result}[/]", f.detail, f.fix)
    blocking = sum(f.is_blocking for f in findings)
    table.caption = f"{blocking} blocking failure(s)" if blocking else "no blocking failure"
    return table


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
