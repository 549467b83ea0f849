"""Path choice from the topology: fastest feasible transport, with the reason."""

from __future__ import annotations

import pytest

from dyn.config.topology import Gpu, Node, NvlinkDomain, Rack, SshTarget, Topology
from dyn.shuttle import Endpoint, PathError, choose_path, plan_paths
from dyn.shuttle.path import may_use_nixl


def _node(name: str, num_gpus: int) -> Node:
    return Node(name=name, rack="r0", ssh=SshTarget("local"),
                gpus=tuple(Gpu(i, "H100-80GB", 80.0) for i in range(num_gpus)))


def _topology() -> Topology:
    """hgx-a, hgx-b: 8-GPU HGX nodes (one domain each); tray-0, tray-1: one NVL72-style domain; cpu."""
    nodes = (_node("hgx-a", 8), _node("hgx-b", 8), _node("tray-0", 4), _node("tray-1", 4), _node("cpu", 0))
    domains = (NvlinkDomain("hgx-a", tuple(("hgx-a", i) for i in range(8))),
               NvlinkDomain("hgx-b", tuple(("hgx-b", i) for i in range(8))),
               NvlinkDomain("nvl72", tuple((t, i) for t in ("tray-0", "tray-1") for i in range(4))))
    return Topology(name="test", racks=(Rack("r0", tuple(n.name for n in nodes)),), nodes=nodes,
                    nvlink_domains=domains, head="cpu", source="topologies/test.yaml")


TOPO = _topology()


@pytest.mark.parametrize("src,dst,cuda,nixl,fabric,transport,words", [
    (Endpoint("hgx-a", (0, 1)), Endpoint("hgx-a", (2, 3)), True, False, False, "cuda_ipc", "NVLink domain 'hgx-a'"),
    (Endpoint("hgx-a", (0,)), Endpoint("hgx-a", (1,)), False, True, False, "shm", "CUDA is not available"),
    (Endpoint("cpu"), Endpoint("cpu"), False, True, False, "shm", "same host 'cpu'"),
    (Endpoint("hgx-a", (0,)), Endpoint("hgx-b", (0,)), True, True, False, "nixl", "NIXL is installed"),
    (Endpoint("hgx-a", (0,)), Endpoint("hgx-b", (0,)), True, False, False, "tcp", "NIXL is not installed"),
    (Endpoint("tray-0", (0,)), Endpoint("tray-1", (3,)), True, False, True, "cuda_ipc", "fabric handles"),
    (Endpoint("tray-0", (0,)), Endpoint("tray-1", (3,)), True, True, False, "nixl", "over multi-node NVLink"),
    (Endpoint("tray-0", (0,)), Endpoint("cpu"), True, False, True, "tcp", "'tray-0' -> 'cpu'"),
])
def test_auto_picks_the_fastest_path_and_says_why(src, dst, cuda, nixl, fabric, transport, words) -> None:
    choice = choose_path(TOPO, src, dst, cuda_available=cuda, nixl_available=nixl, fabric_available=fabric)
    assert choice.transport == transport
    assert words in choice.reason


def test_recipe_can_force_a_feasible_transport() -> None:
    choice = choose_path(TOPO, Endpoint("hgx-a", (0,)), Endpoint("hgx-a", (1,)), "tcp",
                         cuda_available=True, nixl_available=False)
    assert choice == ("tcp", "forced by recipe shuttle.transport='tcp'", "same_node", "network")


@pytest.mark.parametrize("forced,src,dst,cuda,nixl,words", [
    ("shm", Endpoint("hgx-a", (0,)), Endpoint("hgx-b", (0,)), True, False, "needs both workers on one host"),
    ("cuda_ipc", Endpoint("hgx-a", (0,)), Endpoint("hgx-a", (1,)), False, False, "CUDA is not available"),
    ("cuda_ipc", Endpoint("cpu"), Endpoint("cpu"), True, False, "a worker has no GPU"),
    ("cuda_ipc", Endpoint("hgx-a", (0,)), Endpoint("hgx-b", (0,)), True, False, "different hosts"),
    ("nixl", Endpoint("hgx-a", (0,)), Endpoint("hgx-b", (0,)), True, False, "not importable"),
    ("rdma", Endpoint("cpu"), Endpoint("cpu"), False, False, "unknown transport"),
])
def test_infeasible_forced_transport_is_an_error(forced, src, dst, cuda, nixl, words) -> None:
    with pytest.raises(PathError) as info:
        choose_path(TOPO, src, dst, forced, cuda_available=cuda, nixl_available=nixl)
    assert words in str(info.value)
    assert info.value.transport == forced and info.value.src == src.node and info.value.dst == dst.node


def test_unknown_node_or_gpu_is_named() -> None:
    with pytest.raises(PathError, match=r"destination node 'nope' is not in topology 'test' in "
                                        r"topologies/test.yaml \(nodes: hgx-a, "):
        choose_path(TOPO, Endpoint("cpu"), Endpoint("nope"), cuda_available=False, nixl_available=False)
    with pytest.raises(PathError, match=r"source node 'tray-0' has no GPU \[7\]"):
        choose_path(TOPO, Endpoint("tray-0", (7,)), Endpoint("cpu"), cuda_available=True, nixl_available=False)


def test_plan_paths_reports_every_prefill_decode_pair() -> None:
    plan = plan_paths(TOPO, {"p0": Endpoint("hgx-a", (0,))},
                      {"d0": Endpoint("hgx-a", (1,)), "d1": Endpoint("hgx-b", (0,))},
                      cuda_available=True, nixl_available=False)
    assert {pair: choice.transport for pair, choice in plan.items()} == {("p0", "d0"): "cuda_ipc",
                                                                         ("p0", "d1"): "tcp"}


def _one_node(topology: Topology, name: str) -> Topology:
    node = topology.node(name)
    return Topology(name="one", racks=(Rack("r0", (name,)),), nodes=(node,),
                    nvlink_domains=tuple(d for d in topology.nvlink_domains if d.name == name), head=name)


@pytest.mark.parametrize("topology", [TOPO, _one_node(TOPO, "hgx-a"), _one_node(TOPO, "cpu")],
                         ids=["five-nodes", "one-hgx", "one-cpu"])
@pytest.mark.parametrize("forced", ["auto", "nixl", "tcp"])
@pytest.mark.parametrize("installed", [True, False])
def test_workers_start_nixl_exactly_where_a_path_can_choose_it(topology, forced, installed) -> None:
    """may_use_nixl (workers start NIXL agents up front) holds for every pair of places the path
    table could send over NIXL, and for no topology where none could."""
    places = [Endpoint(n.name, gpus) for n in topology.nodes
              for gpus in {(), tuple(g.index for g in n.gpus[:1]), tuple(g.index for g in n.gpus[1:2])}]
    chosen = set()
    for src in places:
        for dst in places:
            for cuda, fabric in ((False, False), (True, False), (True, True)):
                try:
                    chosen.add(choose_path(topology, src, dst, forced, cuda_available=cuda,
                                           nixl_available=installed, fabric_available=fabric).transport)
                except PathError:
                    pass
    assert may_use_nixl(topology, forced, nixl_available=installed) == ("nixl" in chosen)


def test_an_nvlink_domain_hop_never_falls_back_to_tcp() -> None:
    """Trays of one NVL72 domain without fabric handles or NIXL: an error naming the fix, not TCP;
    only an explicit shuttle.transport: tcp accepts TCP there."""
    src, dst = Endpoint("tray-0", (0,)), Endpoint("tray-1", (3,))
    with pytest.raises(PathError, match="share NVLink domain 'nvl72'.*install nixl-cu12") as info:
        choose_path(TOPO, src, dst, cuda_available=True, nixl_available=False)
    assert (info.value.src, info.value.dst) == ("tray-0", "tray-1")
    forced = choose_path(TOPO, src, dst, "tcp", cuda_available=True, nixl_available=False)
    assert (forced.transport, forced.hop) == ("tcp", "nvlink_domain")


from pathlib import Path  # noqa: E402

from dyn.config.loader import load_topology  # noqa: E402
from dyn.shuttle import LinkSpeeds, hop_of  # noqa: E402

SPEEDS = LinkSpeeds()


@pytest.mark.parametrize("topology, src, dst, hop, platform, transport, gbps", [
    # HGX H100x8: one node, one domain.
    ("hgx-h100x8", Endpoint("hgx01", (0,)), Endpoint("hgx01", (4,)), "same_node", "cuda", "cuda_ipc", 900),
    ("hgx-h100x8", Endpoint("hgx01", (0,)), Endpoint("hgx01", (0,)), "same_gpu", "cuda", "cuda_ipc", 1500),
    # GB200 NVL72: 18 trays of 4 GPUs, one domain.
    ("gb200-nvl72", Endpoint("tray01", (0,)), Endpoint("tray01", (1,)), "same_node", "cuda", "cuda_ipc", 900),
    ("gb200-nvl72", Endpoint("tray01", (0,)), Endpoint("tray17", (2,)), "nvlink_domain", "nixl", "nixl", 900),
    ("gb200-nvl72", Endpoint("tray01", (0,)), Endpoint("tray17", (2,)), "nvlink_domain", "fabric", "cuda_ipc", 900),
    # Four NVL72 racks: across domains the network carries it.
    ("gb200-nvl72x4", Endpoint("a-tray01", (0,)), Endpoint("a-tray18", (3,)), "nvlink_domain", "nixl", "nixl", 900),
    ("gb200-nvl72x4", Endpoint("a-tray01", (0,)), Endpoint("b-tray01", (0,)), "cross_domain", "nixl", "nixl", 50),
    ("gb200-nvl72x4", Endpoint("a-tray01", (0,)), Endpoint("b-tray01", (0,)), "cross_domain", "cuda", "tcp", 2),
    # This machine: CPU workers on one node.
    ("local", Endpoint("local"), Endpoint("local"), "same_node", "cpu", "shm", 10),
])
def test_shipped_topologies_path_table(topology, src, dst, hop, platform, transport, gbps) -> None:
    """The same path (and nominal bandwidth) for `dyn status`, the worker's pull and the simulator."""
    topo = load_topology(Path(__file__).resolve().parents[2] / "topologies" / f"{topology}.yaml")
    choice = choose_path(topo, src, dst, cuda_available=platform != "cpu",
                         nixl_available=platform == "nixl", fabric_available=platform == "fabric")
    assert (choice.hop, choice.transport) == (hop, transport)
    assert hop_of(topo, src, dst)[0] == hop
    assert SPEEDS.of(choice) == gbps
