"""Topology: the hardware a deployment runs on, as frozen data.

Loaded and validated once from `topologies/*.yaml` (see dyn.config.loader);
everything else reads these dataclasses, never the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL_ADDRESS = "local"


@dataclass(frozen=True)
class Gpu:
    index: int
    """Index of the GPU on its node (CUDA_VISIBLE_DEVICES numbering)."""
    model: str
    """Marketing name, e.g. "H100-80GB", "GB200"."""
    memory_gib: float


@dataclass(frozen=True)
class SshTarget:
    """How to reach a node. `address == "local"` means this machine, no SSH."""

    address: str
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None

    @property
    def is_local(self) -> bool:
        return self.address == LOCAL_ADDRESS


@dataclass(frozen=True)
class Node:
    """One host (a compute tray of a rack, an HGX server, a laptop)."""

    name: str
    rack: str
    ssh: SshTarget
    gpus: tuple[Gpu, ...] = ()
    host_memory_gib: float = 0.0
    kv_disk_path: str | None = None
    """Directory for the KV disk tier on this node."""
    nics: tuple[str, ...] = ()
    cpus: int | None = None
    """Cores dyn may use on this node (None: all)."""
    bind_address: str = "127.0.0.1"
    """Address this node's processes listen on (never 0.0.0.0 unless set)."""

    @property
    def is_cpu_only(self) -> bool:
        return not self.gpus


@dataclass(frozen=True)
class NvlinkDomain:
    """GPUs that share NVLink: a whole NVL72 rack, or one HGX node."""

    name: str
    members: tuple[tuple[str, int], ...]
    """(node name, GPU index) pairs, in topology order."""

    @property
    def num_gpus(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Rack:
    name: str
    node_names: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    name: str
    racks: tuple[Rack, ...]
    nodes: tuple[Node, ...]
    nvlink_domains: tuple[NvlinkDomain, ...]
    head: str
    """Name of the node that hosts the planner daemon and the frontend."""
    source: str | None = None
    """File it was loaded from, for messages."""
    launch: str = "ssh"
    """How processes start on nodes: "ssh" (or subprocesses for `address: local`), or
    "slurm": job steps (`srun`) inside an allocation, each node's address its Slurm node name."""
    slurm_job: str | None = None
    """The Slurm job (allocation) the steps run in; `dyn up` fills it from SLURM_JOB_ID."""
    _domain_by_gpu: dict[tuple[str, int], str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for domain in self.nvlink_domains:
            for member in domain.members:
                self._domain_by_gpu[member] = domain.name

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def head_node(self) -> Node:
        return self.node(self.head)

    @property
    def num_gpus(self) -> int:
        return sum(len(n.gpus) for n in self.nodes)

    def domain_of(self, node: str, gpu_index: int) -> str | None:
        """The NVLink domain holding a GPU, or None when it has no NVLink peers."""
        return self._domain_by_gpu.get((node, gpu_index))
