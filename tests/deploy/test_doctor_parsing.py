"""The doctor's GPU facts and verdicts on recorded / documented tool outputs (no GPU here).

Where each fixture's format comes from:
* SMI_XML: the element layout of `nvidia-smi -q -x` as given by the DTD that
  ships with the driver (nvsmi_device_v12.dtd: fb_memory_usage, ecc_errors/
  volatile/dram_uncorrectable, clocks/sm_clock, max_clocks/sm_clock, and the
  Hopper/Blackwell `fabric` block with state, status, cliqueId, clusterUuid);
  values are those of a GB200 tray as `nvidia-smi -q` prints them. Written
  from the schema, not captured: this machine has no NVIDIA GPU.
* QUERY_CSV: `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`,
  fields as `nvidia-smi --help-query-gpu` names them.
* NVLINK_STATUS: `nvidia-smi nvlink -s` (per GPU a header line, then one
  `Link N: <speed>` or `Link N: <inactive>` line per link).
* DMESG: kernel lines as NVIDIA's Xid catalog shows them (`NVRM: Xid (PCI:...): 79, ...`).
* FakeNvml: the calls and return shapes of nvidia-ml-py's pynvml module.
"""

from __future__ import annotations

import sys
import types

from dyn.config.loader import parse_topology
from dyn.deploy import doctor_probe as probe
from dyn.deploy.doctor_checks import domain_findings, gpu_findings

SMI_XML = """<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">
<nvidia_smi_log>
  <driver_version>570.124.06</driver_version>
  <cuda_version>12.8</cuda_version>
  <attached_gpus>2</attached_gpus>
  <gpu id="00000008:01:00.0">
    <product_name>NVIDIA GB200</product_name>
    <persistence_mode>Enabled</persistence_mode>
    <uuid>GPU-1b2c3d4e-0000-1111-2222-333344445555</uuid>
    <fb_memory_usage><total>189471 MiB</total><reserved>0 MiB</reserved><used>1 MiB</used><free>188986 MiB</free></fb_memory_usage>
    <ecc_errors><volatile><sram_correctable>0</sram_correctable><sram_uncorrectable>0</sram_uncorrectable>
      <dram_correctable>0</dram_correctable><dram_uncorrectable>0</dram_uncorrectable></volatile></ecc_errors>
    <clocks><graphics_clock>1965 MHz</graphics_clock><sm_clock>1965 MHz</sm_clock></clocks>
    <max_clocks><graphics_clock>2062 MHz</graphics_clock><sm_clock>2062 MHz</sm_clock></max_clocks>
    <fabric><state>Completed</state><status>Success</status><cliqueId>32766</cliqueId>
      <clusterUuid>5cd30dc8-3f15-4c55-9a3e-2a0c7a0e4b11</clusterUuid></fabric>
  </gpu>
  <gpu id="00000009:01:00.0">
    <product_name>NVIDIA GB200</product_name>
    <persistence_mode>Disabled</persistence_mode>
    <uuid>GPU-aaaabbbb-0000-1111-2222-333344445555</uuid>
    <fb_memory_usage><total>189471 MiB</total><reserved>0 MiB</reserved><used>90000 MiB</used><free>99471 MiB</free></fb_memory_usage>
    <ecc_errors><volatile><sram_correctable>0</sram_correctable><sram_uncorrectable>0</sram_uncorrectable>
      <dram_correctable>3</dram_correctable><dram_uncorrectable>2</dram_uncorrectable></volatile></ecc_errors>
    <clocks><graphics_clock>1965 MHz</graphics_clock><sm_clock>1965 MHz</sm_clock></clocks>
    <max_clocks><graphics_clock>2062 MHz</graphics_clock><sm_clock>2062 MHz</sm_clock></max_clocks>
    <fabric><state>In Progress</state><status>N/A</status><cliqueId>32766</cliqueId>
      <clusterUuid>5cd30dc8-3f15-4c55-9a3e-2a0c7a0e4b11</clusterUuid></fabric>
  </gpu>
</nvidia_smi_log>
"""
QUERY_CSV = """0, NVIDIA H100 80GB HBM3, GPU-11111111-2222-3333-4444-555555555555, 81559, 81007, 550.54.15, Enabled, 0, 1980, 1980
1, NVIDIA H100 80GB HBM3, GPU-66666666-2222-3333-4444-555555555555, 81559, 2000, 550.54.15, Disabled, [N/A], 345, 1980
"""
NVLINK_STATUS = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
\t Link 0: 26.562 GB/s
\t Link 1: 26.562 GB/s
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-2222-3333-4444-555555555555)
\t Link 0: 26.562 GB/s
\t Link 1: <inactive>
"""
DMESG = """[ 12.1] nvidia: loading out-of-tree module taints kernel.
[ 901.3] NVRM: Xid (PCI:0000:1b:00): 79, pid=2411, name=python3, GPU has fallen off the bus.
[ 955.0] NVRM: Xid (PCI:0000:1b:00): 48, pid=2411, name=python3, An uncorrectable double bit error
[ 956.0] NVRM: Xid (PCI:0000:3b:00): 79, pid=0, name=, GPU has fallen off the bus.
"""


def test_smi_xml():
    facts = probe.parse_smi_xml(SMI_XML)
    assert facts["driver"] == "570.124.06" and facts["cuda"] == "12.8"
    g0, g1 = facts["gpus"]
    assert (g0["name"], g0["memory_total_mib"], g0["memory_free_mib"]) == ("NVIDIA GB200", 189471, 188986)
    assert g0["persistence"] and not g1["persistence"] and g1["ecc_uncorrected"] == 2
    assert (g0["clock_sm_mhz"], g0["clock_max_sm_mhz"]) == (1965, 2062)
    assert (g0["fabric_state"], g0["clique_id"], g0["cluster_uuid"][:8]) == ("Completed", "32766", "5cd30dc8")
    assert g1["fabric_state"] == "In Progress"


def test_query_csv_and_nvlink_status():
    gpus = probe.parse_query_csv(QUERY_CSV)
    assert [g["index"] for g in gpus] == [0, 1] and gpus[0]["driver"] == "550.54.15"
    assert gpus[1]["ecc_uncorrected"] is None and gpus[1]["memory_free_mib"] == 2000 and not gpus[1]["persistence"]
    assert probe.parse_nvlink_status(NVLINK_STATUS) == {0: ["Active", "Active"], 1: ["Active", "Inactive"]}
    assert probe.count_xids(DMESG) == {"79": 2, "48": 1}


class FakeNvml(types.ModuleType):
    """pynvml's calls with the shapes nvidia-ml-py returns, for 2 H100s (GPU 1: link 1 down)."""

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, NVML_CLOCK_SM, NVML_NVLINK_MAX_LINKS = 1, 0, 1, 2

    def __init__(self):
        super().__init__("pynvml")

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlSystemGetCudaDriverVersion_v2(self): return 12040
    def nvmlSystemGetDriverVersion(self): return "550.54.15"
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetUUID(self, h): return f"GPU-{h}"
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(total=80 << 30, free=79 << 30, used=1 << 30)
    def nvmlDeviceGetPersistenceMode(self, h): return 1
    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter): return 0
    def nvmlDeviceGetClockInfo(self, h, clock): return 1980
    def nvmlDeviceGetMaxClockInfo(self, h, clock): return 1980
    def nvmlDeviceGetNvLinkState(self, h, link): return 0 if (h, link) == (1, 1) else 1


def test_nvml_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    facts = probe.gpu_facts()
    assert facts["source"] == "nvml" and facts["cuda"] == "12.4" and facts["driver"] == "550.54.15"
    assert [g["nvlink"] for g in facts["gpus"]] == [["Active", "Active"], ["Active", "Inactive"]]
    assert facts["gpus"][0]["memory_free_mib"] == 79 * 1024 and facts["gpus"][0]["cluster_uuid"] is None


def _topology(nodes: int, gpus: int = 2):
    entries = "".join(f"      - {{name: t{i}, address: 10.0.0.{i + 1}}}\n" for i in range(nodes))
    return parse_topology(f"name: r\nhead: t0\nnvlink: per-rack\ndefaults: {{gpus: {gpus}, gpu_model: GB200, "
                          f"gpu_memory_gib: 186}}\nracks:\n  - name: a\n    nodes:\n{entries}", "r.yaml")


def test_gpu_verdicts_from_xml_facts():
    topo = _topology(1)
    facts = {"gpu": dict(probe.parse_smi_xml(SMI_XML), source="nvidia-smi -q -x"), "xids": {}}
    found = {f.check: f for f in gpu_findings(topo.node("t0"), facts)}
    assert found["GPUs"].result == "ok"
    assert found["GPU memory"].result == "FAIL" and "1: 99471/189471" in found["GPU memory"].detail
    assert found["ECC/XID"].result == "FAIL" and "GPU 1" in found["ECC/XID"].detail
    assert found["persistence/clocks"].result == "warn" and "-pm 1" in found["persistence/clocks"].fix
    missing = {f.check: f for f in gpu_findings(_topology(1, gpus=4).node("t0"), facts)}
    assert missing["GPUs"].result == "FAIL"
    assert gpu_findings(_topology(1).node("t0"), {"gpu": None})[0].detail == "no NVIDIA GPU found; the topology gives 2"


def test_nvl72_domain_needs_one_clique_and_imex():
    topo = _topology(2)
    good = dict(probe.parse_smi_xml(SMI_XML), source="x")
    other = dict(probe.parse_smi_xml(SMI_XML.replace("<cliqueId>32766", "<cliqueId>7")), source="x")
    facts = {"t0": {"gpu": good, "fabric_daemons": ["nvidia-imex"]}, "t1": {"gpu": other, "fabric_daemons": []}}
    found = [(f.node, f.check, f.result) for f in domain_findings(facts, topo)]
    assert ("t1", "IMEX/fabric manager", "FAIL") in found
    assert ("t0", "NVLink fabric", "FAIL") in found  # GPU 1's fabric state is "In Progress"
    assert ("nvl-a", "NVLink domain", "FAIL") in found
    same = {"t0": facts["t0"], "t1": {"gpu": good, "fabric_daemons": ["nvidia-imex"]}}
    assert ("nvl-a", "NVLink domain", "ok") in [(f.node, f.check, f.result) for f in domain_findings(same, topo)]
    # a topology that cuts one fabric in two: per-rack domains over two one-tray racks
    split = parse_topology("name: s\nhead: t0\nnvlink: per-rack\ndefaults: {gpus: 2, gpu_model: GB200, "
                           "gpu_memory_gib: 186}\nracks:\n  - name: a\n    nodes:\n      - {name: t0, address: x0}\n"
                           "      - {name: t2, address: x2}\n  - name: b\n    nodes:\n"
                           "      - {name: t1, address: x1}\n      - {name: t3, address: x3}\n", "s.yaml")
    four = {n: {"gpu": good, "fabric_daemons": ["nvidia-imex"]} for n in ("t0", "t1", "t2", "t3")}
    warned = [f for f in domain_findings(four, split) if f.result == "warn"]
    assert len(warned) == 1 and warned[0].node == "nvl-a, nvl-b" and "merge them" in warned[0].fix
    pcie = dict(probe.parse_smi_xml(SMI_XML.replace("<fabric>", "<x>").replace("</fabric>", "</x>")), source="x")
    none = {"t0": {"gpu": pcie, "fabric_daemons": ["nvidia-imex"]}, "t1": {"gpu": pcie, "fabric_daemons": ["nvidia-imex"]}}
    assert any("reports no NVLink fabric" in f.detail for f in domain_findings(none, topo))
