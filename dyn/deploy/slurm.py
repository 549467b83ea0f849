"""The Slurm allocation a deployment runs in: its nodes, their GPUs, and a topology for them.

Inside `salloc`/`sbatch`, Slurm describes the allocation in the environment
(SLURM_JOB_ID, SLURM_JOB_NODELIST compressed as a hostlist,
SLURM_JOB_CPUS_PER_NODE like `72(x2),36`) and, per node and exactly, in
`scontrol show job -d` (`Nodes=gpu01 CPU_IDs=0-71 Mem=0 GRES=gpu:4(IDX:0-3)`).
The environment alone does not say how many GPUs each node got (SLURM_JOB_GPUS
and SLURM_GPUS_ON_NODE are set only on the batch node, in the batch step), so
the scontrol detail wins and the environment is the fallback.

`topology_text` writes a topology for an allocation (`dyn topo from-slurm`);
`bind_topology` puts a deployment's topology into the current allocation
(`dyn up --slurm`): nodes are matched by address = Slurm node name.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dyn.deploy.hostlist import expand_hostlist
from dyn.errors import ConfigError, DeploymentError

_DETAIL_RE = re.compile(r"^\s*Nodes=(\S+)\s.*?(?:GRES=(\S*))?\s*$", re.M)
_GPU_GRES_RE = re.compile(r"gpu(?::[A-Za-z0-9_.-]+)?:(\d+)")
_REPEAT_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


@dataclass(frozen=True)
class SlurmNode:
    hostname: str
    """Slurm node name, what `--nodelist` takes."""
    num_gpus: int
    num_cpus: int | None
    address: str | None = None
    """The node's NodeAddr (what its processes bind and are reached at); None: its name resolves."""


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[SlurmNode, ...]

    @property
    def hostnames(self) -> tuple[str, ...]:
        return tuple(n.hostname for n in self.nodes)


def allocation_from_env(environ: Mapping[str, str], job_detail: str | None = None) -> Allocation:
    """The allocation described by a salloc/sbatch environment (+ `scontrol show job -d` text)."""
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job_id:
        raise DeploymentError("not inside a Slurm allocation (SLURM_JOB_ID is not set): run `dyn up --slurm` "
                              "under salloc or in an sbatch script, or set `slurm_job:` in the topology")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise DeploymentError(f"Slurm job {job_id}: SLURM_JOB_NODELIST is not set")
    try:
        hosts = expand_hostlist(nodelist)
    except ConfigError as exc:
        raise DeploymentError(f"Slurm job {job_id}: cannot read SLURM_JOB_NODELIST: {exc}") from None
    cpus = _per_node_counts(environ.get("SLURM_JOB_CPUS_PER_NODE", ""), len(hosts))
    gpus = gpus_from_detail(job_detail) if job_detail else {}
    fallback = gpus_from_env(environ)
    nodes = tuple(SlurmNode(h, gpus.get(h, fallback), cpus[i] if cpus else None) for i, h in enumerate(hosts))
    return Allocation(job_id, nodes)


def current_allocation(environ: Mapping[str, str]) -> Allocation:
    """`allocation_from_env` with the per-node GPU detail and node addresses asked from scontrol
    (when it answers)."""
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or ""
    detail = _scontrol(environ, "show", "job", "-d", job_id) if job_id else None
    allocation = allocation_from_env(environ, detail)
    nodes_text = _scontrol(environ, "show", "node", "-o", ",".join(allocation.hostnames))
    addresses = node_addresses(nodes_text or "")
    return Allocation(allocation.job_id, tuple(replace(n, address=addresses.get(n.hostname))
                                               for n in allocation.nodes))


def node_addresses(text: str) -> dict[str, str]:
    """{NodeName: NodeAddr} from `scontrol show node -o` lines, where the two differ."""
    found = {}
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        name, addr = fields.get("NodeName"), fields.get("NodeAddr")
        if name and addr and addr != name:
            found[name] = addr
    return found


def gpus_from_detail(text: str) -> dict[str, int]:
    """GPUs per node from `scontrol show job -d` lines `Nodes=a[1-2] ... GRES=gpu:h100:4(IDX:0-3)`."""
    found: dict[str, int] = {}
    for match in _DETAIL_RE.finditer(text):
        gres = match.group(2) or ""
        count = sum(int(n) for n in _GPU_GRES_RE.findall(gres))
        for host in expand_hostlist(match.group(1)):
            found[host] = count
    return found


def gpus_from_env(environ: Mapping[str, str]) -> int:
    """GPUs per node the environment states: SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS (indices),
    SLURM_GPUS_PER_NODE / SLURM_TRES_PER_NODE (`gpu:4`, `h100:4`, `gres/gpu:4`); 0 when none."""
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    if environ.get("SLURM_JOB_GPUS"):
        return len([g for g in environ["SLURM_JOB_GPUS"].split(",") if g.strip()])
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_TRES_PER_NODE"):
        value = environ.get(key, "")
        if value.isdigit():
            return int(value)
        match = re.search(r"(?:gpu|gres/gpu)(?::[A-Za-z0-9_.-]+)?[:=](\d+)", value) or \
            re.fullmatch(r"[A-Za-z0-9_.-]+:(\d+)", value)
        if match:
            return int(match.group(1))
    return 0


def topology_text(allocation: Allocation, *, name: str | None = None, gpu_model: str | None = None,
                  gpu_memory_gib: float | None = None, nvlink: str = "per-node",
                  nodes_per_rack: int | None = None) -> str:
    """A topology file for the allocation: one node per Slurm node, head = the first."""
    if nvlink not in ("per-node", "per-rack", "none"):
        raise ConfigError(f"nvlink must be per-node, per-rack or none, got {nvlink!r}", field="--nvlink")
    if any(n.num_gpus for n in allocation.nodes) and not (gpu_model and gpu_memory_gib):
        raise ConfigError("the allocation has GPUs: give --gpu-model and --gpu-memory-gib (e.g. GB200 186), "
                          "or let `dyn topo from-slurm` read them with nvidia-smi on the first node",
                          field="--gpu-model")
    per_rack = nodes_per_rack or len(allocation.nodes)
    lines = [f"# written by `dyn topo from-slurm` for Slurm job {allocation.job_id}",
             f"name: {name or 'slurm-' + allocation.job_id.replace('_', '-')}",
             "launch: slurm", f'slurm_job: "{allocation.job_id}"', f"head: {allocation.nodes[0].hostname}",
             f"nvlink: {nvlink}"]
    if gpu_model:
        lines += ["defaults:", f"  gpu_model: {gpu_model}", f"  gpu_memory_gib: {gpu_memory_gib:g}"]
    lines.append("racks:")
    for start in range(0, len(allocation.nodes), per_rack):
        lines += [f"  - name: rack{start // per_rack + 1:02d}", "    nodes:"]
        for node in allocation.nodes[start:start + per_rack]:
            cpus = f", cpus: {node.num_cpus}" if node.num_cpus else ""
            bind = f", bind_address: {node.address}" if node.address else ""
            lines.append(f"      - {{name: {node.hostname}, address: {node.hostname}, gpus: {node.num_gpus}"
                         f"{cpus}{bind}}}")
    return "\n".join(lines) + "\n"


def bind_topology(text: str, source: str, allocation: Allocation, this_host: str | None = None) -> str:
    """The topology text to deploy with inside `allocation`: `launch: slurm` and the job id
    added when missing; every node must be a node of the allocation (address = Slurm name).
    A topology none of whose addresses is a Slurm node (a shipped rack file) is mapped onto
    the allocation tray by tray (`dyn.deploy.slurm_map`)."""
    from dyn.config.loader import parse_topology

    topology = parse_topology(text, source)
    if topology.slurm_job and topology.slurm_job != allocation.job_id:
        raise DeploymentError(f"{source} names Slurm job {topology.slurm_job} but this shell is in job "
                              f"{allocation.job_id}: rerun `dyn topo from-slurm` here, or drop slurm_job")
    missing = [f"{n.name} ({n.ssh.address})" for n in topology.nodes if n.ssh.address not in allocation.hostnames]
    if len(missing) == len(topology.nodes) and topology.launch != "slurm":
        from dyn.deploy.slurm_map import map_onto_allocation

        return map_onto_allocation(topology, allocation, source, this_host)
    if missing:
        raise DeploymentError(f"{len(missing)} node(s) of {source} are not in Slurm job {allocation.job_id} "
                              f"(nodes {', '.join(allocation.hostnames)}): {', '.join(missing[:8])}; a Slurm "
                              "topology names each node by its Slurm node name in `address` (`dyn topo "
                              "from-slurm` writes one for this allocation)")
    by_host = {n.hostname: n for n in allocation.nodes}
    for node in topology.nodes:
        have = by_host[node.ssh.address].num_gpus
        if len(node.gpus) > have and have:
            raise DeploymentError(f"node {node.name} uses {len(node.gpus)} GPUs in {source} but Slurm job "
                                  f"{allocation.job_id} holds {have} on {node.ssh.address}: ask salloc for "
                                  "--gpus-per-node=" + str(len(node.gpus)))
    extra = []
    if topology.launch != "slurm":
        extra.append("launch: slurm")
    if not topology.slurm_job:
        extra.append(f'slurm_job: "{allocation.job_id}"')
    if not extra:
        return text
    return text.rstrip("\n") + "\n" + "\n".join(extra) + "\n"


def _scontrol(environ: Mapping[str, str], *args: str) -> str | None:
    try:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=15, env=dict(environ))
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _per_node_counts(text: str, num_nodes: int) -> list[int]:
    """Slurm's repeated counts: `72(x2),36` -> [72, 72, 36]; [] when absent or inconsistent."""
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        match = _REPEAT_RE.match(part.strip())
        if match is None:
            return []
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts if len(counts) == num_nodes else []


def slurm_topology_file(path: str | None, environ: Mapping[str, str]) -> str:
    """`dyn up --slurm`: the topology file to deploy with in the current allocation.

    None: one written for the allocation. A file: bound to it (see `bind_topology`).
    The result is written under the state root (`slurm-<job>.topology.yaml`) so the
    deployment record points at a file that holds exactly what was deployed.
    """
    from pathlib import Path

    from dyn.planner.state import state_root

    allocation = current_allocation(environ)
    if path is None:
        model = probe_gpu_model(allocation, environ) if any(n.num_gpus for n in allocation.nodes) else None
        text = topology_text(allocation, gpu_model=model[0] if model else None,
                             gpu_memory_gib=model[1] if model else None)
        stem = f"slurm-{allocation.job_id}"
    else:
        text = bind_topology(Path(path).read_text(), path, allocation, this_node(environ, allocation))
        stem = f"slurm-{allocation.job_id}-{Path(path).stem}"
    root = state_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = root / f"{stem}.topology.yaml"
    out.write_text(text)
    return str(out)


def this_node(environ: Mapping[str, str], allocation: Allocation) -> str | None:
    """The allocation node this process runs on (SLURMD_NODENAME in a batch script or step,
    else this host's name when the allocation holds it); None on a login node."""
    import socket

    name = environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    return name if name in allocation.hostnames else None


def probe_gpu_model(allocation: Allocation, environ: Mapping[str, str]) -> tuple[str, float] | None:
    """(model name, memory GiB) of the first node's GPU 0, asked with nvidia-smi in a job step."""
    from dyn.launch.slurm import srun_argv, srun_env

    argv = srun_argv(allocation.job_id, allocation.nodes[0].hostname,
                     ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=srun_env(environ))
    except (OSError, subprocess.SubprocessError):
        return None
    first = result.stdout.strip().splitlines()[:1]
    if result.returncode != 0 or not first or "," not in first[0]:
        return None
    name, memory_mib = (part.strip() for part in first[0].rsplit(",", 1))
    try:
        return name.replace("NVIDIA ", "").replace(" ", "-"), round(float(memory_mib) / 1024, 1)
    except ValueError:
        return None
