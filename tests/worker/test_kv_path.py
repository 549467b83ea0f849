"""The decode worker's pull transport comes from the topology path named in the offer."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyn.config.loader import load_topology
from dyn.config.recipe import ShuttleSpec
from dyn.shuttle import Endpoint, OfferDescriptor, PathError, SenderConfig
from dyn.worker.kv_path import TopologyPaths

NVL72X4 = load_topology(Path(__file__).resolve().parents[2] / "topologies/gb200-nvl72x4.yaml")


def _offer(node: str = "", gpus: tuple[int, ...] = ()) -> OfferDescriptor:
    return OfferDescriptor(request_id="r", offer_id="o", block_hashes=[1], block_bytes=64,
                           address="tcp://127.0.0.1:1", host_id="h", transports=["cuda_ipc", "shm", "tcp", "nixl"],
                           node=node, gpus=list(gpus))


def test_cross_tray_in_one_domain_pulls_over_nixl_and_across_domains_over_the_network():
    paths = TopologyPaths(NVL72X4, Endpoint("a-tray02", (1,)), cuda_available=True, nixl_available=True)
    same_tray = paths.choice_for(_offer("a-tray02", (0,)))
    cross_tray = paths.choice_for(_offer("a-tray09", (3,)))
    cross_rack = paths.choice_for(_offer("c-tray09", (3,)))
    assert (same_tray.transport, same_tray.hop) == ("cuda_ipc", "same_node")
    assert (cross_tray.transport, cross_tray.hop, cross_tray.link) == ("nixl", "nvlink_domain", "nvlink")
    assert (cross_rack.transport, cross_rack.hop, cross_rack.link) == ("nixl", "cross_domain", "network")


def test_an_offer_without_a_node_leaves_the_choice_to_the_receiver():
    paths = TopologyPaths(NVL72X4, Endpoint("a-tray02", (1,)), cuda_available=True, nixl_available=False)
    assert paths.choice_for(_offer()) is None
    with pytest.raises(PathError, match="never|install nixl-cu12"):
        paths.choice_for(_offer("a-tray09", (3,)))  # no NIXL, no fabric: not TCP over the NVLink domain


def test_offers_name_the_sending_workers_place_and_survive_the_wire():
    config = SenderConfig.from_spec(ShuttleSpec(), address="tcp://127.0.0.1:0", cuda_available=True,
                                    nixl_available=False, node="a-tray02", gpus=(2, 3))
    assert (config.node, config.gpus) == ("a-tray02", (2, 3))
    desc = OfferDescriptor.from_dict(_offer("a-tray02", (2, 3)).to_dict())
    assert (desc.node, desc.gpus) == ("a-tray02", [2, 3])
    old = {k: v for k, v in _offer().to_dict().items() if k not in ("node", "gpus")}  # an older sender
    assert OfferDescriptor.from_dict(old).node == ""
