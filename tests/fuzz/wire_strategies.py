"""Hypothesis strategies for wire frames, derived from the message dataclasses' type hints.

Deriving from the hints (instead of listing fields by hand) means a field
added to a message is fuzzed the day it is added. Three families:

* `valid_message(codec)`: a well-typed instance of any message of the codec;
* `mutated_frame(codec)`: a valid frame with one targeted defect, and a
  description of it (which field, what kind of defect);
* `msgpack_values()`: arbitrary msgpack-able values (the garbage baseline).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import random

import msgpack
from hypothesis import strategies as st

from dyn import PROTOCOL_VERSION
from dyn.control.codec import Codec, Message

UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)

msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(INT64_MIN, UINT64_MAX),
    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20))


def msgpack_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any value msgpack can carry (str keys only, as the codec's strict_map_key demands).

    Flat shapes come from hypothesis (they shrink well); deep ones are grown
    from a drawn seed, because st.recursive costs ~10 ms per draw on this box.
    """
    flat = st.one_of(msgpack_scalars, st.lists(msgpack_scalars, max_size=3),
                     st.dictionaries(st.text(max_size=6), msgpack_scalars, max_size=3))
    return st.one_of(flat, st.integers(0, 2**32 - 1).map(lambda s: seeded_value(s, max_leaves)))


def seeded_value(seed: int, max_leaves: int) -> Any:
    """A nested msgpack value (up to `max_leaves` leaves) grown deterministically from `seed`."""
    rng = random.Random(seed)
    budget = [max_leaves]

    def grow(depth: int) -> Any:
        budget[0] -= 1
        pick = rng.randrange(10) if budget[0] > 0 and depth < 8 else rng.randrange(7)
        if pick == 0:
            return None
        if pick == 1:
            return rng.random() < 0.5
        if pick == 2:
            return rng.choice([0, -1, 1, 2**31, 2**63 - 1, INT64_MIN, UINT64_MAX, rng.randrange(-99, 99)])
        if pick == 3:
            return rng.choice([0.0, -0.0, 1e308, -1e-308, float("inf"), rng.uniform(-1e6, 1e6)])
        if pick == 4:
            return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF), 0]))
                           for _ in range(rng.randrange(12)))
        if pick == 5:
            return rng.randbytes(rng.randrange(12))
        if pick == 6:
            return rng.choice(["", "ready", "prefill", "drain", "status", "heartbeat", "device"])
        if pick in (7, 8):
            return [grow(depth + 1) for _ in range(rng.randrange(5))]
        return {str(grow(depth + 1))[:8]: grow(depth + 1) for _ in range(rng.randrange(4))}

    return grow(0)


def for_hint(hint: Any) -> st.SearchStrategy[Any]:
    """Values that a field annotated `hint` accepts, in their wire form (lists, not tuples)."""
    origin = get_origin(hint)
    if hint is Any:
        return msgpack_values(6)
    if origin in (Union, types.UnionType):
        return st.one_of(*(for_hint(h) for h in get_args(hint)))
    if hint is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(get_args(hint))
    if dataclasses.is_dataclass(hint):  # nested (SamplingParams): a map of its fields
        return valid_fields(hint)
    if origin in (list, tuple):
        args = get_args(hint)
        return st.lists(for_hint(args[0] if args else Any), max_size=6)
    if origin is dict:
        key, value = get_args(hint) or (Any, Any)
        return st.dictionaries(for_hint(key) if key is not Any else st.text(max_size=8), for_hint(value),
                               max_size=4)
    if hint is int:
        return st.integers(INT64_MIN, UINT64_MAX)
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=24)
    if hint is bool:
        return st.booleans()
    if hint is bytes:
        return st.binary(max_size=24)
    raise TypeError(f"no strategy for {hint}")


def message_types(codec: Codec) -> list[type[Message]]:
    return list(codec._types.values())  # the codec is the registry of its family


def hints_of(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_fields(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """The wire form of a valid instance: every required field, any subset of the defaulted ones."""
    hints = hints_of(cls)
    required = {f.name: for_hint(hints[f.name]) for f in dataclasses.fields(cls) if _is_required(f)}
    optional = {f.name: for_hint(hints[f.name]) for f in dataclasses.fields(cls) if not _is_required(f)}
    return st.fixed_dictionaries(required, optional=optional)


def valid_message(codec: Codec) -> st.SearchStrategy[tuple[type[Message], dict[str, Any]]]:
    return st.sampled_from(message_types(codec)).flatmap(
        lambda cls: st.tuples(st.just(cls), valid_fields(cls)))


@dataclass(frozen=True)
class Mutation:
    """One defect planted in an otherwise valid frame."""

    kind: str
    tag: str
    field: str | None = None


def frame(tag: Any, fields: Any, version: Any = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, tag, fields], use_bin_type=True)


def wrong_value_for(hint: Any) -> st.SearchStrategy[Any]:
    """msgpack values that mostly do not fit `hint` (the codec decides; some may fit)."""
    return st.one_of(msgpack_values(8), st.integers(INT64_MIN, UINT64_MAX), st.text(max_size=4),
                     st.lists(st.integers(INT64_MIN, UINT64_MAX), max_size=3), st.floats(),
                     st.binary(max_size=4))


@st.composite
def mutated_frame(draw: st.DrawFn, codec: Codec) -> tuple[bytes, Mutation]:
    cls, fields = draw(valid_message(codec))
    tag = cls.TYPE
    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
    kind = draw(st.sampled_from(["retype", "drop", "unknown", "version", "tag", "shape", "nest"]))
    if kind == "retype":
        name = draw(st.sampled_from(names))
        fields = {**fields, name: draw(wrong_value_for(hints_of(cls)[name]))}
        return frame(tag, fields), Mutation(kind, tag, name)
    if kind == "drop" and required:
        name = draw(st.sampled_from(required))
        return frame(tag, {k: v for k, v in fields.items() if k != name}), Mutation(kind, tag, name)
    if kind == "unknown":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in names))
        return frame(tag, {**fields, name: draw(msgpack_values(4))}), Mutation(kind, tag, name)
    if kind == "version":
        version = draw(st.one_of(st.integers(INT64_MIN, UINT64_MAX).filter(lambda v: v != PROTOCOL_VERSION),
                                 st.text(max_size=4), st.none(), st.floats(allow_nan=False)
                                 .filter(lambda v: v != PROTOCOL_VERSION)))
        return frame(tag, fields, version), Mutation(kind, tag)
    if kind == "tag":
        other = draw(st.one_of(st.text(max_size=16), st.integers(INT64_MIN, UINT64_MAX), st.none(), st.binary(max_size=8))
                     .filter(lambda t: t not in codec._types))
        return frame(other, fields), Mutation(kind, tag)
    if kind == "nest":  # a field value buried deep in lists
        name = draw(st.sampled_from(names))
        value: Any = fields.get(name, 0)
        for _ in range(draw(st.integers(1, 40))):
            value = [value]
        return frame(tag, {**fields, name: value}), Mutation("retype", tag, name)
    shape = draw(st.sampled_from(["not-a-list", "short", "long", "fields-not-map"]))
    data: Any = {
        "not-a-list": {"v": PROTOCOL_VERSION, "t": tag},
        "short": [PROTOCOL_VERSION, tag],
        "long": [PROTOCOL_VERSION, tag, fields, None],
        "fields-not-map": [PROTOCOL_VERSION, tag, list(fields.items())],
    }[shape]
    return msgpack.packb(data, use_bin_type=True), Mutation("shape", tag)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
