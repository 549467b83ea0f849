"""The KV shuttle: moves whole KV blocks (hash + payload) between workers.

ShuttleSender (prefill side) pins exports and serves them; ShuttleReceiver
(decode side) pulls them into the pool's destination views, verified.
choose_path picks the transport for a pair of workers from the topology.
"""

from dyn.shuttle.errors import PathError, TransferError
from dyn.shuttle.path import HOPS, Endpoint, LinkSpeeds, PathChoice, choose_path, hop_of, plan_paths
from dyn.shuttle.receiver import ReceiverConfig, ShuttleReceiver, TransferStats
from dyn.shuttle.sender import Offer, SenderConfig, ShuttleSender
from dyn.shuttle.wire import OfferDescriptor

__all__ = [
    "HOPS", "Endpoint", "LinkSpeeds", "Offer", "OfferDescriptor", "PathChoice", "PathError", "ReceiverConfig", "SenderConfig",
    "ShuttleReceiver", "ShuttleSender", "TransferError", "TransferStats", "choose_path", "hop_of",
    "plan_paths",
]
