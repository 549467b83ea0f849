"""`dyn doctor`'s verdicts: facts from the node probes -> findings (ok, warn, FAIL, skipped) with fixes.

Pure functions over the JSON the probe (`dyn.deploy.doctor_probe`) returns,
so every verdict is tested on recorded or documented tool outputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dyn.config.topology import Node, Topology

if TYPE_CHECKING:
    from dyn.deploy.doctor import DoctorInputs

MAX_SKEW_S = 5.0
"""Logs and request traces are merged across nodes by wall clock; beyond this they lie."""
MIN_FREE_GPU_RATIO = 0.9


@dataclass(frozen=True)
class Finding:
    node: str
    check: str
    result: str
    """ok | warn | FAIL | skipped"""
    detail: str
    fix: str = ""

    @property
    def is_blocking(self) -> bool:
        return self.result == "FAIL"


def node_findings(node: Node, facts: dict[str, Any], inputs: "DoctorInputs", sent: float,
                  received: float) -> list[Finding]:
    """Everything one node's facts say on their own (and against the head's clock and version)."""
    n = node.name
    out: list[Finding] = []
    # the probe read its clock at its start, somewhere between `sent` and `received - elapsed`
    latest = max(sent, received - float(facts.get("elapsed_s") or 0))
    skew = facts["time_s"] - (sent + latest) / 2
    slack = (latest - sent) / 2
    if abs(skew) > MAX_SKEW_S + slack:
        out.append(Finding(n, "clock", "FAIL", f"{skew:+.1f} s from the head",
                           "sync clocks: `chronyc makestep` (or `timedatectl set-ntp true`) on the node"))
    else:
        out.append(Finding(n, "clock", "ok", f"{skew:+.2f} s from the head (±{slack:.2f})"))
    if facts.get("dyn") == inputs.head_version:
        out.append(Finding(n, "dyn version", "ok", f"dyn {facts['dyn']}"))
    elif facts.get("dyn") is None:
        out.append(Finding(n, "dyn version", "FAIL", f"`{' '.join(inputs.dyn_command)} --version` failed: "
                           f"{facts.get('dyn_error') or 'not found'}",
                           f"install dyn {inputs.head_version} there (scripts/install-nodes.sh)"))
    else:
        out.append(Finding(n, "dyn version", "FAIL", f"dyn {facts['dyn']}, head runs {inputs.head_version}",
                           f"pip install dyn=={inputs.head_version} on the node (scripts/install-nodes.sh)"))
    python = facts.get("python", "0.0.0")
    major_minor = ".".join(python.split(".")[:2])
    if tuple(int(p) for p in python.split(".")[:2]) < (3, 11):
        out.append(Finding(n, "python", "FAIL", f"python3 is {python}; dyn needs >= 3.11",
                           "install Python 3.11+ and reinstall dyn with it"))
    else:
        out.append(Finding(n, "python", "ok" if major_minor == inputs.head_python else "warn",
                           f"{python}" + ("" if major_minor == inputs.head_python else f", head runs {inputs.head_python}"),
                           "" if major_minor == inputs.head_python else "use the head's Python minor version"))
    for where, state in sorted(facts.get("ports", {}).items()):
        if state == "free":
            out.append(Finding(n, f"port {where}", "ok", "free"))
        else:
            port = where.rsplit(":", 1)[1]
            out.append(Finding(n, f"port {where}", "FAIL", f"cannot bind: {state}",
                               f"stop what listens (`ss -ltnp 'sport = :{port}'`) or change the recipe's port"))
    if inputs.model_path:
        out += _model_findings(n, facts, inputs.model_path)
    out += gpu_findings(node, facts)
    return out


def gpu_findings(node: Node, facts: dict[str, Any]) -> list[Finding]:
    n = node.name
    gpu = facts.get("gpu")
    if gpu is None or not gpu.get("gpus"):
        if node.gpus:
            return [Finding(n, "GPUs", "FAIL", f"no NVIDIA GPU found; the topology gives {len(node.gpus)}",
                            "install the NVIDIA driver (nvidia-smi must work) or fix gpus in the topology")]
        return [Finding(n, "GPUs", "skipped", "skipped: no GPU")]
    gpus = gpu["gpus"]
    out: list[Finding] = []
    want = [g.index for g in node.gpus]
    have = {g["index"] for g in gpus}
    missing = [i for i in want if i not in have]
    if missing:
        out.append(Finding(n, "GPUs", "FAIL", f"{len(gpus)} found, topology uses indices {want}",
                           "fix gpus in the topology, or check `nvidia-smi -L` for a fallen-off GPU"))
    else:
        out.append(Finding(n, "GPUs", "ok", f"{len(gpus)} x {gpus[0]['name']} ({gpu.get('source')})"))
    if node.gpus and node.gpus[0].model != "any" and not any(_same_model(node.gpus[0].model, g["name"]) for g in gpus):
        out.append(Finding(n, "GPU model", "warn", f"{gpus[0]['name']} vs topology {node.gpus[0].model}",
                           "set gpu_model in the topology to what the node has"))
    used = [g for g in gpus if g["index"] in want] or gpus
    busy = [f"{g['index']}: {g['memory_free_mib']}/{g['memory_total_mib']} MiB free" for g in used
            if g.get("memory_total_mib") and (g.get("memory_free_mib") or 0) < MIN_FREE_GPU_RATIO * g["memory_total_mib"]]
    out.append(Finding(n, "GPU memory", "FAIL" if busy else "ok", "; ".join(busy) or "free on every used GPU",
                       "another process holds GPU memory: `nvidia-smi --query-compute-apps=pid,used_memory "
                       "--format=csv`" if busy else ""))
    ecc = [str(g["index"]) for g in used if g.get("ecc_uncorrected")]
    xids = facts.get("xids") or {}
    if ecc or xids:
        out.append(Finding(n, "ECC/XID", "FAIL" if ecc else "warn",
                           f"uncorrected ECC on GPU {','.join(ecc)}" if ecc else f"Xid codes seen {xids}",
                           "drain the node; reset the GPU (`nvidia-smi -r`) or RMA it per the Xid catalog"))
    else:
        out.append(Finding(n, "ECC/XID", "ok", "no uncorrected ECC, no Xid" if facts.get("xids") is not None
                           else "no uncorrected ECC (kernel log unreadable: Xids not checked)"))
    off = [str(g["index"]) for g in used if g.get("persistence") is False]
    slow = [str(g["index"]) for g in used if g.get("clock_sm_mhz") and g.get("clock_max_sm_mhz")
            and g["clock_sm_mhz"] < 0.5 * g["clock_max_sm_mhz"] and (g.get("memory_free_mib") or 0) < g["memory_total_mib"]]
    out.append(Finding(n, "persistence/clocks", "warn" if off or slow else "ok",
                       (f"persistence off on GPU {','.join(off)}" if off else "persistence on") +
                       (f"; SM clock under half of max on GPU {','.join(slow)}" if slow else ""),
                       "`nvidia-smi -pm 1` (or nvidia-persistenced); check `nvidia-smi -q -d PERFORMANCE` "
                       "for throttle reasons" if off or slow else ""))
    links = [(g["index"], g["nvlink"]) for g in used if g.get("nvlink")]
    down = [f"GPU {i} link {k}" for i, states in links for k, s in enumerate(states) if s != "Active"]
    if not links:
        out.append(Finding(n, "NVLink", "skipped", "no NVLink reported"))
    else:
        out.append(Finding(n, "NVLink", "FAIL" if down else "ok", ", ".join(down[:6]) or
                           f"{sum(len(s) for _, s in links)} links active",
                           "reseat/replace the link; `nvidia-smi nvlink -s` and `-e` show state and errors"
                           if down else ""))
    return out


def fleet_findings(facts: dict[str, dict[str, Any]], inputs: "DoctorInputs") -> list[Finding]:
    """What only shows across nodes: uniform driver/CUDA, identical weights, NVLink domains."""
    out: list[Finding] = []
    drivers = {n: f"{f['gpu']['driver']} / CUDA {f['gpu'].get('cuda') or '?'}" for n, f in facts.items()
               if f.get("gpu")}
    out += _odd_ones_out(drivers, "driver/CUDA", "install the driver version the other nodes run")
    if inputs.model_path:
        digests = {n: f"{w['digest']} ({w['files']} files, {w['bytes']} B)" for n, f in facts.items()
                   if (w := f.get("weights"))}
        out += _odd_ones_out(digests, "weights identical",
                             f"copy {inputs.model_path} again from a good node (rsync -a --checksum)")
    out += domain_findings(facts, inputs.topology)
    return out


def domain_findings(facts: dict[str, dict[str, Any]], topology: Topology) -> list[Finding]:
    """On multi-node NVLink (NVL72) every GPU of a topology domain must report the same fabric
    cluster UUID and clique, with the fabric manager / IMEX running and fabric state Completed."""
    out: list[Finding] = []
    domains_of_clique: dict[tuple[str, str], set[str]] = {}
    for domain in topology.nvlink_domains:
        nodes = sorted({m[0] for m in domain.members})
        if len(nodes) < 2:
            continue
        cliques: dict[tuple[str, str], list[str]] = {}
        for name in nodes:
            gpu = (facts.get(name) or {}).get("gpu")
            if not gpu:
                continue
            daemons = facts[name].get("fabric_daemons", [])
            if "nvidia-imex" not in daemons:
                out.append(Finding(name, "IMEX/fabric manager", "FAIL", f"running: {daemons or 'none'}",
                                   "multi-node NVLink needs nvidia-imex (and nv-fabricmanager on NVSwitch "
                                   "trays): `systemctl enable --now nvidia-imex`"))
            for g in gpu["gpus"]:
                if g.get("cluster_uuid") is None:
                    out.append(Finding(name, "NVLink fabric", "FAIL", f"GPU {g['index']} reports no NVLink fabric, "
                                       f"but domain {domain.name} spans {len(nodes)} nodes",
                                       "multi-node NVLink needs an NVL72-class system; otherwise use "
                                       "`nvlink: per-node` in the topology"))
                    continue
                if g.get("fabric_state") != "Completed":
                    out.append(Finding(name, "NVLink fabric", "FAIL", f"GPU {g['index']} fabric state "
                                       f"{g.get('fabric_state')} ({g.get('fabric_status')})",
                                       "check nvidia-imex and fabric manager logs; the GPU is not in the fabric"))
                cliques.setdefault((g["cluster_uuid"], g.get("clique_id") or ""), []).append(f"{name}:{g['index']}")
        if len(cliques) > 1:
            parts = "; ".join(f"{uuid[:8]}/{clique}: {len(gpus)} GPUs (e.g. {gpus[0]})"
                              for (uuid, clique), gpus in cliques.items())
            out.append(Finding(domain.name, "NVLink domain", "FAIL", f"GPUs report {len(cliques)} fabric "
                               f"domains: {parts}", "fix the topology's nvlink_domains to match the fabric "
                               "(cluster UUID / clique), or repair the fabric"))
        elif cliques:
            (uuid, clique), gpus = next(iter(cliques.items()))
            out.append(Finding(domain.name, "NVLink domain", "ok", f"{len(gpus)} GPUs in cluster {uuid[:8]} "
                               f"clique {clique}"))
        for key in cliques:
            domains_of_clique.setdefault(key, set()).add(domain.name)
    for (uuid, clique), names in domains_of_clique.items():
        if len(names) > 1:
            out.append(Finding(", ".join(sorted(names)), "NVLink domain", "warn", f"one fabric (cluster "
                               f"{uuid[:8]} clique {clique}) split into {len(names)} topology domains",
                               "merge them into one nvlink domain: TP groups and the KV shuttle may use NVLink "
                               "across all of it"))
    return out


def _model_findings(node: str, facts: dict[str, Any], path: str) -> list[Finding]:
    weights = facts.get("weights")
    free = facts.get("free_bytes") or 0
    if weights is None:
        return [Finding(node, "model files", "FAIL", f"{path} does not exist",
                        f"copy the checkpoint to {path} on the node (rsync -a from a good node)")]
    return [Finding(node, "model files", "ok", f"{weights['files']} files, {weights['bytes'] / 2**30:.2f} GiB"),
            Finding(node, "disk free", "ok" if free > 2**30 else "warn", f"{free / 2**30:.1f} GiB free at {path}",
                    "" if free > 2**30 else "free disk space for logs and the KV disk tier")]


def _odd_ones_out(values: dict[str, str], check: str, fix: str) -> list[Finding]:
    if not values:
        return []
    common, _ = Counter(values.values()).most_common(1)[0]
    return [Finding(node, check, "ok" if value == common else "FAIL",
                    value if value == common else f"{value}; most nodes: {common}", "" if value == common else fix)
            for node, value in values.items()]


def _same_model(want: str, name: str) -> bool:
    simplify = lambda s: "".join(ch for ch in s.lower() if ch.isalnum()).replace("nvidia", "")  # noqa: E731
    return simplify(want)[:4] in simplify(name)
