"""Weight-plane messages: a starting worker asks a peer to offer a batch of arena blocks.

    fetcher (DEALER)                               peer's WeightServer (ROUTER)
    OfferWeights(key, block_idx=[], manifest=True) --->
                                                   <--- WeightsOffered(manifest, offer=None)
    OfferWeights(key, block_idx=[0..15])           --->  waits for its bandwidth share
                                                   <--- WeightsOffered(offer=OfferDescriptor)
    ... the blocks then move on the shuttle (Pull/Blocks/Credit/End/Done) ...

One request, one reply, in order, per connection. The payload bytes never
pass through these messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dyn.control.codec import Codec, Message

MAX_WEIGHTS_MESSAGE_BYTES = 32 << 20
"""A manifest of a 700 GB model in 4 MiB blocks lists ~180k block hashes (~2 MB)."""


@dataclass(slots=True)
class OfferWeights(Message):
    TYPE: ClassVar[str] = "weights.offer_request"
    key: str
    """The weights key the asker computed from its own checkpoint copy (dyn.weights.manifest)."""
    block_idx: list[int] = field(default_factory=list)
    manifest: bool = False
    """Send the manifest back (first request of a fetch)."""


@dataclass(slots=True)
class WeightsOffered(Message):
    TYPE: ClassVar[str] = "weights.offered"
    ok: bool
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    offer: dict[str, Any] = field(default_factory=dict)
    """An OfferDescriptor as a dict (dyn.shuttle.OfferDescriptor.to_dict); empty for a manifest-only reply."""


WEIGHTS_CODEC = Codec([OfferWeights, WeightsOffered], max_message_bytes=MAX_WEIGHTS_MESSAGE_BYTES)
