"""The decode worker's transport for each offer: the topology path (dyn.shuttle.path), so the
live pull moves bytes the way `dyn status` and the simulator say it does.

An offer names the sending worker's node and GPUs; with the receiving worker's
own place, `choose_path` gives the transport (cuda_ipc on one node or over
fabric handles, NIXL over multi-node NVLink between trays of one domain, NIXL
or TCP across domains). An offer without a node (an older sender) falls back
to the receiver's host-id rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dyn.config.recipe import Transport
from dyn.config.topology import Topology
from dyn.shuttle import Endpoint, OfferDescriptor, PathChoice, choose_path


@dataclass(slots=True)
class TopologyPaths:
    topology: Topology
    here: Endpoint
    """This (receiving) worker's node and GPUs."""
    forced: Transport = "auto"
    cuda_available: bool = False
    nixl_available: bool = False
    fabric_available: bool = False
    _cache: dict[tuple[str, tuple[int, ...]], PathChoice] = field(default_factory=dict)

    def choice_for(self, offer: OfferDescriptor) -> PathChoice | None:
        """The path from the offer's worker to this one; None when the offer names no node.
        Raises PathError (a DynError) when no acceptable transport exists for the pair."""
        if not offer.node:
            return None
        key = (offer.node, tuple(offer.gpus))
        choice = self._cache.get(key)
        if choice is None:
            choice = choose_path(self.topology, Endpoint(*key), self.here, self.forced,
                                 cuda_available=self.cuda_available, nixl_available=self.nixl_available,
                                 fabric_available=self.fabric_available)
            self._cache[key] = choice
        return choice
