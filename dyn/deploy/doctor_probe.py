"""The node side of `dyn doctor`: one stdlib-only Python program, sent as `python3 -c SOURCE`.

This file is executed as it is on every node (one round trip per node): it
reads its arguments as JSON on stdin and prints one JSON object of facts.
It must not import dyn (the node's dyn may be missing or another version)
and uses only the standard library, plus pynvml when the node has it.

GPU facts come from NVML (nvidia-ml-py) where it exposes them; otherwise
from `nvidia-smi -q -x` (the XML of nvidia-smi's "-q" report, described in
nvidia-smi's man page and its DTD, nvsmi_device_v12.dtd) and
`nvidia-smi --query-gpu=... --format=csv,noheader,nounits`. The parsers are
plain functions so tests run them on recorded outputs.

Test hooks (hosts of a test share one machine; real nodes never set these):
DYN_DOCTOR_CLOCK_OFFSET_S adds seconds to the reported clock (a test cannot
move the real clock), DYN_DOCTOR_FS_ROOT prefixes every path looked at (so
hosts sharing one file system can hold different files).
"""

import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

SAMPLE_BYTES = 1 << 20
QUERY_FIELDS = ("index,name,uuid,memory.total,memory.free,driver_version,persistence_mode,"
                "ecc.errors.uncorrected.volatile.total,clocks.sm,clocks.max.sm")
FABRIC_DAEMONS = ("nv-fabricmanager", "nvidia-imex")


def parse_query_csv(text):
    """Rows of `nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 10:
            continue
        gpus.append({"index": _int(cells[0]), "name": cells[1], "uuid": cells[2],
                     "memory_total_mib": _int(cells[3]), "memory_free_mib": _int(cells[4]),
                     "driver": cells[5], "persistence": cells[6] == "Enabled",
                     "ecc_uncorrected": _int(cells[7]), "clock_sm_mhz": _int(cells[8]),
                     "clock_max_sm_mhz": _int(cells[9])})
    return gpus


def parse_smi_xml(text):
    """Driver, CUDA and per-GPU facts (incl. NVLink and fabric) from `nvidia-smi -q -x`."""
    root = ET.fromstring(text)
    out = {"driver": root.findtext("driver_version", ""), "cuda": root.findtext("cuda_version", ""), "gpus": []}
    for i, gpu in enumerate(root.findall("gpu")):
        fabric = gpu.find("fabric")
        links = None  # `-q` does not report link state: NVML, or `nvidia-smi nvlink -s` (parse_nvlink_status)
        out["gpus"].append({
            "index": i, "name": gpu.findtext("product_name", ""), "uuid": gpu.findtext("uuid", ""),
            "memory_total_mib": _mib(gpu.findtext("fb_memory_usage/total")),
            "memory_free_mib": _mib(gpu.findtext("fb_memory_usage/free")),
            "persistence": gpu.findtext("persistence_mode", "") == "Enabled",
            "ecc_uncorrected": _int(gpu.findtext("ecc_errors/volatile/dram_uncorrectable")
                                    or gpu.findtext("ecc_errors/volatile/total/uncorr_ecc") or "0"),
            "clock_sm_mhz": _int((gpu.findtext("clocks/sm_clock") or "").split(" ")[0]),
            "clock_max_sm_mhz": _int((gpu.findtext("max_clocks/sm_clock") or "").split(" ")[0]),
            "nvlink": links,
            "fabric_state": fabric.findtext("state", "") if fabric is not None else None,
            "fabric_status": fabric.findtext("status", "") if fabric is not None else None,
            "cluster_uuid": _first_text(fabric, ("clusterUuid", "cluster_uuid", "ClusterUUID")),
            "clique_id": _first_text(fabric, ("cliqueId", "clique_id", "CliqueId")),
        })
    return out


def parse_nvlink_status(text):
    """{gpu index: ["Active" | "Inactive", ...]} from `nvidia-smi nvlink -s`
    (`GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)` then `\t Link 3: 26.562 GB/s` or `Link 3: <inactive>`)."""
    links, current = {}, None
    for line in text.splitlines():
        gpu = re.match(r"GPU (\d+):", line)
        if gpu:
            current = int(gpu.group(1))
            links[current] = []
            continue
        link = re.match(r"\s+Link \d+: (.*)", line)
        if link and current is not None:
            links[current].append("Inactive" if "inactive" in link.group(1).lower() else "Active")
    return links


def count_xids(text):
    """NVRM Xid lines in kernel messages (`NVRM: Xid (PCI:0000:1b:00): 79, ...`), by Xid code."""
    codes = {}
    for match in re.finditer(r"NVRM: Xid \([^)]*\): (\d+)", text):
        codes[match.group(1)] = codes.get(match.group(1), 0) + 1
    return codes


def gpu_facts():
    """NVML first, nvidia-smi otherwise; None when the node has no NVIDIA GPU."""
    try:
        return _nvml_facts()
    except Exception:  # no pynvml, no driver, or an NVML call this driver lacks
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        xml = subprocess.run(["nvidia-smi", "-q", "-x"], capture_output=True, text=True, timeout=60)
        if xml.returncode == 0:
            facts = dict(parse_smi_xml(xml.stdout), source="nvidia-smi -q -x")
            status = subprocess.run(["nvidia-smi", "nvlink", "-s"], capture_output=True, text=True, timeout=60)
            for index, states in parse_nvlink_status(status.stdout).items():
                if index < len(facts["gpus"]) and states:
                    facts["gpus"][index]["nvlink"] = states
            return facts
        csv = subprocess.run(["nvidia-smi", "--query-gpu=" + QUERY_FIELDS, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
        gpus = parse_query_csv(csv.stdout)
        return {"driver": gpus[0]["driver"] if gpus else "", "cuda": "", "gpus": gpus,
                "source": "nvidia-smi --query-gpu"} if gpus else None
    except (OSError, subprocess.SubprocessError, ET.ParseError):
        return None


def _nvml_facts():
    import pynvml as nv

    nv.nvmlInit()
    try:
        cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
        out = {"driver": _text(nv.nvmlSystemGetDriverVersion()), "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
               "gpus": [], "source": "nvml"}
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            gpu = {"index": i, "name": _text(nv.nvmlDeviceGetName(h)), "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                   "memory_total_mib": mem.total >> 20, "memory_free_mib": mem.free >> 20,
                   "persistence": _try(lambda: nv.nvmlDeviceGetPersistenceMode(h) == 1, None),
                   "ecc_uncorrected": _try(lambda: nv.nvmlDeviceGetTotalEccErrors(
                       h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC), 0),
                   "clock_sm_mhz": _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), None),
                   "clock_max_sm_mhz": _try(lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM), None),
                   "nvlink": None, "fabric_state": None, "cluster_uuid": None, "clique_id": None}
            links = []
            for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
                state = _try(lambda: nv.nvmlDeviceGetNvLinkState(h, link), None)
                if state is None:
                    continue
                links.append("Active" if state == 1 else "Inactive")
            gpu["nvlink"] = links or None
            info = nv.c_nvmlGpuFabricInfo_t() if hasattr(nv, "c_nvmlGpuFabricInfo_t") else None
            if info is not None and _try(lambda: nv.nvmlDeviceGetGpuFabricInfo(h, ctypes.byref(info)), None) is None:
                info = None  # pre-Hopper GPU or older driver: no fabric
            if info is not None:
                gpu["fabric_state"] = {0: "Not Supported", 1: "Not Started", 2: "In Progress",
                                       3: "Completed"}.get(info.state, str(info.state))
                gpu["cluster_uuid"] = "-".join(f"{b:02x}" for b in bytes(info.clusterUuid)) if any(
                    bytes(info.clusterUuid)) else ""
                gpu["clique_id"] = str(info.cliqueId)
            out["gpus"].append(gpu)
        return out
    finally:
        nv.nvmlShutdown()


def running_daemons(names):
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in names:
            found.add(comm)
    return sorted(found)


def weights_digest(path):
    """{files, bytes, digest}: sizes and the first and last MiB of every file, hashed."""
    if not os.path.exists(path):
        return None
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    h, total = hashlib.sha256(), 0
    for name in files:
        size = os.path.getsize(name)
        total += size
        h.update(f"{os.path.relpath(name, path)}\0{size}\0".encode())
        with open(name, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(-SAMPLE_BYTES, os.SEEK_END)
                h.update(f.read(SAMPLE_BYTES))
    return {"files": len(files), "bytes": total, "digest": h.hexdigest()[:16]}


def port_state(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return "free"
        except OSError as e:
            return os.strerror(e.errno) if e.errno else str(e)


def dyn_version(argv):
    try:
        out = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    match = re.search(r"\bdyn\s+(\S+)", out.stdout)
    return (match.group(1), "") if match else (None, (out.stderr or out.stdout).strip()[-200:])


def dyn_python(argv):
    """Version of the Python that runs dyn (the #! line of the dyn script), None when unknown."""
    exe = shutil.which(argv[0]) if argv else None
    if os.path.basename(argv[0] if argv else "").startswith("python"):
        interpreter = [exe or argv[0]]
    else:
        try:
            with open(exe or "", "rb") as f:
                line = f.readline(256).decode(errors="replace").strip()
        except OSError:
            return None
        if not line.startswith("#!") or "python" not in line:
            return None
        interpreter = line[2:].split()
    try:
        out = subprocess.run(interpreter + ["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def free_bytes(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/")) or "/"
    return shutil.disk_usage(path or "/").free


def main(args):
    started = time.time()
    root = os.environ.get("DYN_DOCTOR_FS_ROOT", "")
    command = list(args.get("dyn_command") or ["dyn"])
    facts = {"hostname": socket.gethostname(), "python": dyn_python(command) or "%d.%d.%d" % sys.version_info[:3]}
    facts["dyn"], facts["dyn_error"] = dyn_version(command)
    model = args.get("model_path")
    if model:
        facts["weights"] = weights_digest(root + model)
        facts["free_bytes"] = free_bytes(root + model)
    facts["ports"] = {f"{h}:{p}": port_state(h, p) for h, p in args.get("ports", [])}
    facts["gpu"] = gpu_facts()
    if facts["gpu"] is not None:
        facts["fabric_daemons"] = running_daemons(FABRIC_DAEMONS)
        try:
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
            facts["xids"] = count_xids(dmesg.stdout) if dmesg.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            facts["xids"] = None
    facts["time_s"] = started + float(os.environ.get("DYN_DOCTOR_CLOCK_OFFSET_S", "0") or 0)
    facts["elapsed_s"] = time.time() - started
    return facts


def _int(text):
    try:
        return int(float(str(text).strip()))
    except (TypeError, ValueError):
        return None


def _first_text(element, names):
    if element is None:
        return None
    for name in names:
        value = element.findtext(name)
        if value is not None:
            return value.strip()
    return ""


def _mib(text):
    return _int((text or "").split(" ")[0])


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(fn, default):
    try:
        return fn()
    except Exception:
        return default


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.stdin.read() or "{}"))))
