"""Reading an allocation: env + `scontrol show job -d`, topology writing and binding.

The `scontrol show job -d` text below follows the per-node detail lines Slurm
prints (`Nodes=... CPU_IDs=... Mem=... GRES=gpu:N(IDX:...)`), as recorded from
the test cluster (tests/slurm_cluster.py, Slurm 22.05.8) and extended to a
typed-GPU, two-line allocation.
"""

from __future__ import annotations

import pytest

from dyn.config.loader import parse_topology
from dyn.deploy.slurm import (allocation_from_env, bind_topology, gpus_from_detail, gpus_from_env,
                              topology_text)
from dyn.errors import ConfigError, DeploymentError

DETAIL = """JobId=77 JobName=interactive
   NumNodes=3 NumCPUs=216 NumTasks=3 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   JOB_GRES=gpu:h100:12
     Nodes=gpu[01-02] CPU_IDs=0-71 Mem=0 GRES=gpu:h100:4(IDX:0-3)
     Nodes=gpu03 CPU_IDs=0-71 Mem=0 GRES=gpu:h100:4(IDX:4-7)
   TresPerNode=gres:gpu:h100:4
"""
ENV = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36"}


def test_allocation_from_env_and_detail():
    alloc = allocation_from_env(ENV, DETAIL)
    assert alloc.job_id == "77" and alloc.hostnames == ("gpu01", "gpu02", "gpu03")
    assert [n.num_gpus for n in alloc.nodes] == [4, 4, 4]
    assert [n.num_cpus for n in alloc.nodes] == [72, 72, 36]


def test_gpu_counts_from_environment_forms():
    assert gpus_from_env({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert gpus_from_env({"SLURM_JOB_GPUS": "0,1,2,3"}) == 4
    assert gpus_from_env({"SLURM_GPUS_PER_NODE": "h100:2"}) == 2
    assert gpus_from_env({"SLURM_TRES_PER_NODE": "gres/gpu:4"}) == 4
    assert gpus_from_env({}) == 0
    assert gpus_from_detail("     Nodes=vm CPU_IDs=0 Mem=0 GRES=\n") == {"vm": 0}


def test_outside_an_allocation_is_a_clear_error():
    with pytest.raises(DeploymentError, match="not inside a Slurm allocation"):
        allocation_from_env({})


def test_written_topology_loads_and_maps_nodes():
    alloc = allocation_from_env(ENV, DETAIL)
    text = topology_text(alloc, gpu_model="H100-80GB", gpu_memory_gib=80, nvlink="per-rack", nodes_per_rack=2)
    topo = parse_topology(text, "t.yaml")
    assert topo.launch == "slurm" and topo.slurm_job == "77" and topo.head == "gpu01"
    assert [r.node_names for r in topo.racks] == [("gpu01", "gpu02"), ("gpu03",)]
    assert [d.num_gpus for d in topo.nvlink_domains] == [8, 4]
    assert topo.node("gpu03").cpus == 36
    with pytest.raises(ConfigError, match="--gpu-model"):
        topology_text(alloc)


def test_bind_topology_by_hostname():
    alloc = allocation_from_env(ENV, DETAIL)
    mine = ("name: two\nhead: a\nracks:\n  - name: r\n    nodes:\n"
            "      - {name: a, address: gpu02, gpus: 4, gpu_model: H100, gpu_memory_gib: 80}\n")
    bound = parse_topology(bind_topology(mine, "two.yaml", alloc), "two.yaml")
    assert bound.launch == "slurm" and bound.slurm_job == "77" and bound.node("a").ssh.address == "gpu02"
    with pytest.raises(DeploymentError, match=r"not in Slurm job 77.*b \(gpu09\)"):
        bind_topology(mine + "      - {name: b, address: gpu09}\n", "two.yaml", alloc)
    with pytest.raises(DeploymentError, match="holds 4 on gpu02"):
        bind_topology(mine.replace("gpus: 4", "gpus: 8"), "two.yaml", alloc)


def test_topology_file_launch_keys_are_checked():
    base = "name: t\nracks:\n  - name: r\n    nodes:\n      - {name: a, address: local}\n"
    with pytest.raises(ConfigError, match="launch: must be one of ssh, slurm"):
        parse_topology(base + "launch: k8s\n", "t.yaml")
    with pytest.raises(ConfigError, match="address: local"):
        parse_topology(base + "launch: slurm\n", "t.yaml")
    with pytest.raises(ConfigError, match="slurm_job needs"):
        parse_topology(base + "slurm_job: 5\n", "t.yaml")


def test_node_addresses_become_bind_addresses():
    from dataclasses import replace

    from dyn.deploy.slurm import node_addresses

    # `scontrol show node -o` lines as the test cluster (Slurm 22.05.8) prints them, shortened
    text = ("NodeName=vm Arch=x86_64 CoresPerSocket=1 Gres=gpu:4 NodeAddr=127.0.0.1 NodeHostName=vm Port=60565\n"
            "NodeName=gpu01 Arch=x86_64 NodeAddr=gpu01 NodeHostName=gpu01\n")
    assert node_addresses(text) == {"vm": "127.0.0.1"}
    alloc = allocation_from_env({"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "vm"})
    alloc = replace(alloc, nodes=(replace(alloc.nodes[0], address="127.0.0.1"),))
    assert parse_topology(topology_text(alloc), "t.yaml").node("vm").bind_address == "127.0.0.1"


def test_a_shipped_rack_maps_onto_an_allocation_tray_by_tray():
    from pathlib import Path

    from dyn.deploy.slurm import SlurmNode, Allocation

    source = Path(__file__).resolve().parents[2] / "topologies" / "gb200-nvl72.yaml"
    rack = parse_topology(source.read_text(), str(source))
    alloc = Allocation("88", tuple(SlurmNode(f"gb-r3-{i:02d}", 4, 144, f"10.3.0.{i}") for i in range(1, 19)))
    mapped = parse_topology(bind_topology(source.read_text(), str(source), alloc), "mapped.yaml")
    assert mapped.launch == "slurm" and mapped.slurm_job == "88" and mapped.head == rack.head
    assert [n.name for n in mapped.nodes] == [n.name for n in rack.nodes]
    assert [n.ssh.address for n in mapped.nodes] == list(alloc.hostnames)
    assert mapped.node("tray02").bind_address == "10.3.0.2" and mapped.num_gpus == 72
    assert [(d.name, d.members) for d in mapped.nvlink_domains] == [(d.name, d.members) for d in rack.nvlink_domains]
    # dyn up runs on gb-r3-05 (the batch host): the head tray goes there, tray05 takes the first node
    swapped = parse_topology(bind_topology(source.read_text(), str(source), alloc, "gb-r3-05"), "m.yaml")
    assert swapped.node(rack.head).ssh.address == "gb-r3-05" and swapped.node("tray05").ssh.address == "gb-r3-01"
    small = Allocation("89", alloc.nodes[:16])
    with pytest.raises(DeploymentError, match="has 18 nodes but Slurm job 89 holds 16"):
        bind_topology(source.read_text(), str(source), small)
