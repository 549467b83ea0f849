"""The offer descriptor crosses the request plane as a dict and is validated on arrival."""

from __future__ import annotations

import pytest

from dyn.errors import ProtocolError
from dyn.shuttle import OfferDescriptor

GOOD = OfferDescriptor(request_id="r1", offer_id="abc", block_hashes=[1, 2**63 - 1], block_bytes=4096,
                       address="tcp://127.0.0.1:7000", host_id="h/boot", transports=["shm", "tcp"])


def test_descriptor_round_trips_through_a_dict() -> None:
    assert OfferDescriptor.from_dict(GOOD.to_dict()) == GOOD


@pytest.mark.parametrize("change,words", [
    ({"block_hashes": ["x"]}, "block_hashes: expected an integer"),
    ({"block_bytes": 0}, "block_bytes: must be positive"),
    ({"evil": 1}, "unknown fields ['evil']"),
    ({"address": None}, "address: expected str"),
    ({"address": "http://x"}, "is not a tcp:// or ipc:// endpoint"),
    ({"block_hashes": [-1]}, "-1 is not a 64-bit block hash"),
])
def test_bad_descriptor_fields_are_named(change: dict, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        OfferDescriptor.from_dict({**GOOD.to_dict(), **change})
    assert words in str(info.value)


def test_missing_field_and_non_map() -> None:
    data = GOOD.to_dict()
    del data["offer_id"]
    with pytest.raises(ProtocolError, match="missing field 'offer_id'"):
        OfferDescriptor.from_dict(data)
    with pytest.raises(ProtocolError, match="kv_source: expected a map"):
        OfferDescriptor.from_dict([1, 2])  # type: ignore[arg-type]
