"""`dyn doctor`: check every node of a topology before `dyn up`, one table of findings.

Each node runs `dyn.deploy.doctor_probe` once (`python3 -c`, arguments as
JSON on stdin, facts as JSON back) through the deployment's own launcher:
SSH, a subprocess for `address: local`, or a Slurm job step. The head then
compares the facts with the topology, the recipe and each other. A finding
is `ok`, `warn`, `FAIL` (blocking: `dyn up` would fail or misbehave) or
`skipped` (e.g. "skipped: no GPU"); every non-ok finding says how to fix it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyn import __version__
from dyn.config.topology import Node, Topology
from dyn.deploy.doctor_checks import Finding, fleet_findings, node_findings
from dyn.errors import DynError

_PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DoctorInputs:
    topology: Topology
    model_path: str | None = None
    """The recipe's checkpoint path on the nodes (None: mock engine / no recipe)."""
    ports: tuple[tuple[str, str, int], ...] = ()
    """(node, host, port) that must be free, e.g. the frontend's on the head."""
    dyn_command: tuple[str, ...] = ("dyn",)
    """How dyn runs on remote nodes (SSH, or Slurm steps)."""
    local_dyn_command: tuple[str, ...] = ("dyn",)
    """... on `address: local` nodes (this head's install)."""
    accept_new_host_keys: bool = False
    head_version: str = __version__
    head_python: str = "%d.%d" % sys.version_info[:2]


def probe_source() -> str:
    return Path(__file__).with_name("doctor_probe.py").read_text()


async def run_doctor(inputs: DoctorInputs) -> list[Finding]:
    """Probe every node (all at once) and return the findings, node by node."""
    from dyn.launch.pool import RunnerPool
    from dyn.launch.ssh import SshOptions, connect

    topology = inputs.topology
    connector = connect
    if topology.launch == "slurm":
        from dyn.launch.slurm import SlurmConnector

        connector = SlurmConnector(topology.slurm_job or "")
    source = probe_source()

    async def probe(runner) -> tuple[dict[str, Any], float, float]:
        node = runner.node.name
        local = runner.node.ssh.is_local and topology.launch != "slurm"
        args = {"dyn_command": list(inputs.local_dyn_command if local else inputs.dyn_command),
                "model_path": inputs.model_path, "ports": [[h, p] for n, h, p in inputs.ports if n == node]}
        sent = time.time()
        result = await runner.run(("python3", "-c", source), timeout_s=_PROBE_TIMEOUT_S, input=json.dumps(args))
        received = time.time()
        if not result.ok:
            raise DynError(f"the probe exited {result.exit_status}: {(result.stderr or result.stdout)[-300:]}")
        return json.loads(result.stdout.strip().splitlines()[-1]), sent, received

    async with RunnerPool(list(topology.nodes), SshOptions(retries=1, accept_new_host_keys=inputs.accept_new_host_keys),
                          connector=connector) as pool:
        answers = await pool.gather(probe)
    findings: list[Finding] = []
    facts_by_node: dict[str, dict[str, Any]] = {}
    for node in topology.nodes:
        answer = answers[node.name]
        if isinstance(answer, BaseException):
            findings.append(Finding(node.name, "reachable", "FAIL", _first_line(answer),
                                    _reach_fix(topology, node)))
            continue
        facts, sent, received = answer
        facts_by_node[node.name] = facts
        findings.append(Finding(node.name, "reachable", "ok", f"{facts.get('hostname')}, "
                                f"{(received - sent) * 1000:.0f} ms round trip"))
        findings += node_findings(node, facts, inputs, sent, received)
    findings += fleet_findings(facts_by_node, inputs)
    return findings


def has_blocking(findings: list[Finding]) -> bool:
    return any(f.is_blocking for f in findings)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _reach_fix(topology: Topology, node: Node) -> str:
    if topology.launch == "slurm":
        return f"check the allocation runs (`squeue -j {topology.slurm_job}`) and holds {node.ssh.address}"
    return "check address/port/user in the topology and that sshd runs; scripts/distribute-keys.sh sets up keys"


def doctor_inputs(topology_path: str | None, recipe_path: str | None, *, slurm: bool = False,
                  dyn_command: tuple[str, ...] | None = None, accept_new_host_keys: bool = False) -> DoctorInputs:
    """Load the files (binding them to the current Slurm allocation with --slurm or `launch: slurm`);
    the recipe adds its model path and the frontend port on the head."""
    import os

    from dyn.config.loader import parse_recipe, parse_topology, resolve_file

    if slurm or topology_path is not None:
        path = None if topology_path is None else str(resolve_file("topology", topology_path))
    else:
        path = str(resolve_file("topology", None))
    text = Path(path).read_text() if path else ""
    if path is None or slurm or parse_topology(text, path).launch == "slurm":
        from dyn.deploy.slurm import bind_topology, current_allocation, this_node, topology_text

        allocation = current_allocation(dict(os.environ))
        text = bind_topology(text, path, allocation, this_node(os.environ, allocation)) if path else topology_text(
            allocation, gpu_model="any", gpu_memory_gib=1)
        path = path or f"slurm job {allocation.job_id}"
    topology = parse_topology(text, path)
    model_path, ports = None, ()
    if recipe_path is not None:
        rpath = resolve_file("recipe", recipe_path)
        recipe = parse_recipe(rpath.read_text(), str(rpath))
        if recipe.model.engine != "mock":
            model_path = recipe.model.path
        if recipe.frontend.port:
            ports = ((topology.head, recipe.frontend.host, recipe.frontend.port),)
    from dyn.deploy.bringup import local_dyn_command

    local = local_dyn_command()
    remote = dyn_command or (local if topology.launch == "slurm" else ("dyn",))
    return DoctorInputs(topology=topology, model_path=model_path, ports=ports, dyn_command=remote,
                        local_dyn_command=local, accept_new_host_keys=accept_new_host_keys)


def run(inputs: DoctorInputs) -> list[Finding]:
    return asyncio.run(run_doctor(inputs))
