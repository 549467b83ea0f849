"""Topology files: YAML -> `Topology`, with every error located.

The file format (documented in docs_formats.md) is shorter than the
dataclasses: `defaults` fill node entries, one entry with a range pattern
stands for many trays, and NVLink domains are derived from `nvlink:
per-node | per-rack | none` unless listed explicitly.
"""

from __future__ import annotations

from typing import Any

from dyn.config.fields import (NAME_RE, checked_name, disk_path, entries, local_file, number, opt_text,
                               text, unique)
from dyn.config.ranges import RangeError, expand, has_range
from dyn.config.schema import check_keys, join, suggest
from dyn.config.topology import LOCAL_ADDRESS, Gpu, Node, NvlinkDomain, Rack, SshTarget, Topology
from dyn.config.yamlmap import LocatedDoc, type_name

TOP_KEYS = ("name", "head", "nvlink", "defaults", "racks", "nvlink_domains", "launch", "slurm_job")
LAUNCH_MODES = ("ssh", "slurm")
RACK_KEYS = ("name", "nvlink", "nodes")
DOMAIN_KEYS = ("name", "nodes")
NODE_KEYS = ("name", "address", "port", "user", "identity_file", "known_hosts", "gpus", "gpu_model",
             "gpu_memory_gib", "host_memory_gib", "kv_disk_path", "nics", "cpus", "bind_address")
DEFAULT_KEYS = tuple(k for k in NODE_KEYS if k not in ("name", "address"))
RANGE_KEYS = ("name", "address", "port", "bind_address")
NVLINK_MODES = ("per-node", "per-rack", "none")


def topology_from_doc(doc: LocatedDoc) -> Topology:
    data = doc.data
    check_keys(data, TOP_KEYS, "", doc)
    name = checked_name(doc, data, "name", "")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise doc.error("defaults", f"expected a mapping, got {type_name(defaults)}")
    check_keys(defaults, DEFAULT_KEYS, "defaults", doc)
    racks_data = entries(doc, data, "racks", "", required=True)
    explicit = "nvlink_domains" in data
    mode = _mode(doc, data, "nvlink", "", explicit)
    racks: list[Rack] = []
    nodes: list[Node] = []
    node_paths: dict[str, str] = {}
    rack_paths: dict[str, str] = {}
    domains: list[NvlinkDomain] = []
    for r, rack_data in enumerate(racks_data):
        rpath = f"racks[{r}]"
        if not isinstance(rack_data, dict):
            raise doc.error(rpath, f"each rack is a mapping with name and nodes, got {type_name(rack_data)}")
        check_keys(rack_data, RACK_KEYS, rpath, doc)
        rack_name = checked_name(doc, rack_data, "name", rpath)
        unique(doc, rack_paths, rack_name, join(rpath, "name"), "rack")
        rack_mode = _mode(doc, rack_data, "nvlink", rpath, explicit) or mode or "per-node"
        rack_nodes: list[Node] = []
        for e, entry in enumerate(entries(doc, rack_data, "nodes", rpath, required=True)):
            for node in _expand_entry(doc, entry, f"{rpath}.nodes[{e}]", defaults, rack_name):
                unique(doc, node_paths, node.name, f"{rpath}.nodes[{e}].name", "node")
                rack_nodes.append(node)
        racks.append(Rack(rack_name, tuple(n.name for n in rack_nodes)))
        nodes.extend(rack_nodes)
        if not explicit:
            domains.extend(_derived_domains(rack_name, rack_nodes, rack_mode))
    _check_addresses(doc, nodes, node_paths)
    if explicit:
        domains = _explicit_domains(doc, data["nvlink_domains"], nodes)
    head = _head(doc, data, nodes)
    launch, slurm_job = _launch(doc, data, nodes)
    return Topology(name=name, racks=tuple(racks), nodes=tuple(nodes), nvlink_domains=tuple(domains),
                    head=head, source=doc.source, launch=launch, slurm_job=slurm_job)


def _launch(doc: LocatedDoc, data: dict[str, Any], nodes: list[Node]) -> tuple[str, str | None]:
    launch = data.get("launch", "ssh")
    if launch not in LAUNCH_MODES:
        raise doc.error("launch", f"must be one of {', '.join(LAUNCH_MODES)}; got {launch!r}",
                        hint=suggest(str(launch), list(LAUNCH_MODES), "choices"))
    job = data.get("slurm_job")
    if job is not None:
        if launch != "slurm":
            raise doc.error("slurm_job", "slurm_job needs `launch: slurm`")
        if isinstance(job, bool) or not str(job).replace("_", "").isdigit():
            raise doc.error("slurm_job", f"expected a Slurm job id like 1234 or 1234_7, got {job!r}")
        job = str(job)
    if launch == "slurm":
        for node in nodes:
            if node.ssh.is_local:
                raise doc.error("launch", f"node {node.name!r} has `address: local`, but `launch: slurm` "
                                "starts every process as a job step on a Slurm node",
                                hint="set address to the node's Slurm name (hostname), or drop launch: slurm")
    return launch, job


def _expand_entry(doc: LocatedDoc, entry: Any, path: str, defaults: dict[str, Any], rack: str) -> list[Node]:
    if not isinstance(entry, dict):
        raise doc.error(path, f"each node entry is a mapping with name and address, got {type_name(entry)}")
    check_keys(entry, NODE_KEYS, path, doc)
    for key in ("name", "address"):
        if key not in entry:
            raise doc.error(path, f"missing required key '{key}'", hint=f"add `{key}:` to this node entry")
    merged = {**defaults, **entry}
    columns: dict[str, list[Any]] = {}
    for key in RANGE_KEYS:
        value = merged.get(key)
        if isinstance(value, str) and has_range(value):
            try:
                columns[key] = expand(value)
            except RangeError as exc:
                raise doc.error(_where(key, entry, defaults, path), str(exc)) from None
    count = len(columns.get("name", [None]))
    for key, values in columns.items():
        if len(values) != count:
            raise doc.error(_where(key, entry, defaults, path),
                            f"expands to {len(values)} values but name gives {count} node(s)",
                            hint="ranges in one entry must have the same length")
    nodes = []
    for i in range(count):
        values = {**merged, **{k: v[i] for k, v in columns.items()}}
        nodes.append(_node(doc, values, entry, path, rack))
    return nodes


def _node(doc: LocatedDoc, v: dict[str, Any], entry: dict[str, Any], path: str, rack: str) -> Node:
    def where(key: str) -> str:
        return _where(key, entry, v, path)

    name = v["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise doc.error(where("name"), f"node name {name!r} must be letters, digits, '.', '_' or '-'")
    address = text(doc, v, "address", where)
    port = v.get("port", 22)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise doc.error(where("port"), f"port must be an integer 1-65535, got {port!r}")
    ssh = SshTarget(address=address, port=port, user=opt_text(doc, v, "user", where),
                    identity_file=local_file(doc, v, "identity_file", where),
                    known_hosts=local_file(doc, v, "known_hosts", where))
    gpus = _gpus(doc, v, where)
    nics = v.get("nics", [])
    if not isinstance(nics, list) or not all(isinstance(n, str) for n in nics):
        raise doc.error(where("nics"), "nics must be a list of interface names, e.g. [mlx5_0, mlx5_1]")
    cpus = v.get("cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
        raise doc.error(where("cpus"), f"cpus must be a positive integer, got {cpus!r}")
    bind = opt_text(doc, v, "bind_address", where)
    if bind is None:
        bind = "127.0.0.1" if address == LOCAL_ADDRESS else address
    return Node(name=name, rack=rack, ssh=ssh, gpus=gpus,
                host_memory_gib=number(doc, v, "host_memory_gib", where, 0.0, minimum=0.0),
                kv_disk_path=disk_path(opt_text(doc, v, "kv_disk_path", where), address), nics=tuple(nics), cpus=cpus,
                bind_address=bind)


MAX_GPUS_PER_NODE = 1024


def _gpus(doc: LocatedDoc, v: dict[str, Any], where) -> tuple[Gpu, ...]:
    raw = v.get("gpus", 0)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= MAX_GPUS_PER_NODE:
        indices = list(range(raw))
    elif isinstance(raw, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                       and 0 <= i < MAX_GPUS_PER_NODE for i in raw):
        indices = list(raw)
        if len(set(indices)) != len(indices):
            raise doc.error(where("gpus"), f"GPU index listed twice in {raw}")
    else:
        raise doc.error(where("gpus"), f"gpus must be a count (e.g. 8) or a list of indices, each at most "
                                       f"{MAX_GPUS_PER_NODE}, got {raw!r}")
    if not indices:
        return ()
    model = v.get("gpu_model")
    if not isinstance(model, str) or not model:
        raise doc.error(where("gpu_model"), "nodes with GPUs need gpu_model (e.g. H100-80GB)",
                        hint="set it on the node or under defaults")
    memory = number(doc, v, "gpu_memory_gib", where, None, minimum=0.0)
    if not memory:
        raise doc.error(where("gpu_memory_gib"), "nodes with GPUs need gpu_memory_gib > 0",
                        hint="set it on the node or under defaults")
    return tuple(Gpu(index=i, model=model, memory_gib=memory) for i in indices)


def _derived_domains(rack: str, nodes: list[Node], mode: str) -> list[NvlinkDomain]:
    if mode == "none":
        return []
    if mode == "per-rack":
        members = tuple((n.name, g.index) for n in nodes for g in n.gpus)
        return [NvlinkDomain(f"nvl-{rack}", members)] if members else []
    return [NvlinkDomain(f"nvl-{n.name}", tuple((n.name, g.index) for g in n.gpus)) for n in nodes if n.gpus]


def _explicit_domains(doc: LocatedDoc, raw: Any, nodes: list[Node]) -> list[NvlinkDomain]:
    by_name = {n.name: n for n in nodes}
    owner: dict[str, str] = {}
    seen: dict[str, str] = {}
    domains = []
    if not isinstance(raw, list):
        raise doc.error("nvlink_domains", f"expected a list of domains, got {type_name(raw)}")
    for d, item in enumerate(raw):
        dpath = f"nvlink_domains[{d}]"
        if not isinstance(item, dict):
            raise doc.error(dpath, f"each domain is a mapping with name and nodes, got {type_name(item)}")
        check_keys(item, DOMAIN_KEYS, dpath, doc)
        name = checked_name(doc, item, "name", dpath)
        unique(doc, seen, name, join(dpath, "name"), "NVLink domain")
        members: list[tuple[str, int]] = []
        for i, pattern in enumerate(entries(doc, item, "nodes", dpath, required=True)):
            ipath = f"{dpath}.nodes[{i}]"
            if not isinstance(pattern, str):
                raise doc.error(ipath, f"expected a node name, got {type_name(pattern)}")
            try:
                names = expand(pattern)
            except RangeError as exc:
                raise doc.error(ipath, str(exc)) from None
            for node_name in names:
                if node_name not in by_name:
                    raise doc.error(ipath, f"no node named '{node_name}'", hint=suggest(node_name, list(by_name), "nodes"))
                if node_name in owner:
                    raise doc.error(ipath, f"node '{node_name}' is already in domain '{owner[node_name]}'",
                                    hint="a GPU belongs to one NVLink domain")
                owner[node_name] = name
                members.extend((node_name, g.index) for g in by_name[node_name].gpus)
        if not members:
            raise doc.error(dpath, f"domain '{name}' holds no GPUs", hint="list nodes that have gpus")
        domains.append(NvlinkDomain(name, tuple(members)))
    return domains


def _check_addresses(doc: LocatedDoc, nodes: list[Node], node_paths: dict[str, str]) -> None:
    seen: dict[tuple[str, Any], str] = {}
    for node in nodes:
        # Several `local` nodes are fine (one machine standing in for a rack) if each binds its own address.
        key = ("local", node.bind_address) if node.ssh.is_local else (node.ssh.address, node.ssh.port)
        if key in seen:
            what = f"bind_address {node.bind_address}" if node.ssh.is_local else f"address {key[0]}:{key[1]}"
            raise doc.error(node_paths[node.name], f"node '{node.name}' has the same {what} as '{seen[key]}'",
                            hint="each node needs its own address (or port)")
        seen[key] = node.name


def _head(doc: LocatedDoc, data: dict[str, Any], nodes: list[Node]) -> str:
    names = [n.name for n in nodes]
    if "head" not in data:
        if len(nodes) == 1:
            return nodes[0].name
        raise doc.error("", "missing head node: set `head:` to the node that runs the planner and frontend",
                        hint=f"e.g. head: {names[0]}")
    head = data["head"]
    if head not in names:
        raise doc.error("head", f"head {head!r} is not a node of this topology", hint=suggest(str(head), names, "nodes"))
    return head


def _mode(doc: LocatedDoc, data: dict[str, Any], key: str, path: str, explicit: bool) -> str | None:
    if key not in data:
        return None
    if explicit:
        raise doc.error(join(path, key), "`nvlink` and `nvlink_domains` cannot both be set",
                        hint="list domains explicitly or derive them, not both")
    value = data[key]
    if value not in NVLINK_MODES:
        raise doc.error(join(path, key), f"must be one of {', '.join(NVLINK_MODES)}; got {value!r}",
                        hint=suggest(str(value), list(NVLINK_MODES), "choices"))
    return value


def _where(key: str, entry: dict[str, Any], merged: dict[str, Any], path: str) -> str:
    """Errors point at the entry's key, at `defaults` when inherited, else at the entry."""
    if key in entry:
        return join(path, key)
    return f"defaults.{key}" if key in merged else path