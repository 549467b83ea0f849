"""msgpack codec for wire messages: versioned, typed, validated on receipt.

A frame is the msgpack array ``[protocol_version, type_tag, {field: value}]``.
Decoding checks the version, the tag, every field's type (nested dataclasses
such as SamplingParams field by field) and the sizes, so a receiver only ever
sees a well-formed dataclass or a ProtocolError.
No pickle: only msgpack's plain types travel.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Iterable, TypeVar, Union, get_args, get_origin

import msgpack

from dyn import PROTOCOL_VERSION
from dyn.errors import ProtocolError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Hard cap on one decoded frame; sockets also set ZMQ_MAXMSGSIZE."""
MAX_STR_CHARS = 1 << 20
MAX_ITEMS = 1 << 22

M = TypeVar("M")
_INT_ONLY = frozenset((int,))


class Message:
    """Base of every wire message. Subclasses are dataclasses with a unique TYPE."""

    TYPE: ClassVar[str] = ""


class Codec:
    """Encodes and decodes one family of messages (control, request, ...)."""

    def __init__(self, message_types: Iterable[type[Message]], *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._types: dict[str, type[Message]] = {}
        for cls in message_types:
            assert dataclasses.is_dataclass(cls) and cls.TYPE, cls
            assert cls.TYPE not in self._types, f"duplicate message type {cls.TYPE}"
            self._types[cls.TYPE] = cls
            _plan(cls)  # resolve the annotations now: a bad one fails at import, not on receipt

    def encode(self, message: Message) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, message.TYPE, _fields(message)], use_bin_type=True)

    def decode(self, data: bytes | memoryview) -> Message:
        if len(data) > self.max_message_bytes:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}")
        try:
            frame = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_STR_CHARS,
                                    max_bin_len=self.max_message_bytes, max_array_len=MAX_ITEMS,
                                    max_map_len=MAX_ITEMS)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
        if not isinstance(frame, list) or len(frame) != 3:
            raise ProtocolError("frame is not [version, type, fields]")
        version, tag, fields = frame
        if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1.0 == 1 in Python
            raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
        cls = self._types.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {tag!r}")
        if not isinstance(fields, dict):
            raise ProtocolError(f"{tag}: fields are not a map")
        return _build(cls, fields, tag)

    def decode_as(self, data: bytes | memoryview, expected: type[M]) -> M:
        message = self.decode(data)
        if not isinstance(message, expected):
            raise ProtocolError(f"expected {expected.__name__}, got {type(message).__name__}")
        return message


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass as a map of its fields; nested dataclasses (e.g. SamplingParams, a list of
    TokenChunks) become maps too."""
    return {name: getattr(obj, name) if not nested else _wire(getattr(obj, name), nested)
            for name, nested in _encode_plan(type(obj))}


def _wire(value: Any, nested: str) -> Any:
    """A field's value in its wire form: `nested` is "one" (the value may be a dataclass) or
    "list" (a list of dataclasses)."""
    if nested == "list" and isinstance(value, (list, tuple)):
        return [_fields(v) if dataclasses.is_dataclass(v) else v for v in value]
    return _fields(value) if dataclasses.is_dataclass(value) else value


@functools.cache
def _encode_plan(cls: type) -> tuple[tuple[str, str], ...]:
    """Per field of `cls`: its name and whether its value may be a dataclass ("one"), a list of
    them ("list") or neither ("") (from the hints, once: the frontend encodes a GenerateRequest
    per request, and the per-field is_dataclass test on every value was a third of that)."""
    hints = _hints(cls)
    return tuple((f.name, _nesting(hints[f.name])) for f in dataclasses.fields(cls))


def _nesting(hint: Any) -> str:
    if get_origin(hint) in (list, tuple) and any(dataclasses.is_dataclass(a) for a in get_args(hint)):
        return "list"
    return "one" if _may_hold_dataclass(hint) else ""


def _may_hold_dataclass(hint: Any) -> bool:
    if hint is Any or dataclasses.is_dataclass(hint):
        return True
    return get_origin(hint) in (Union, types.UnionType) and any(_may_hold_dataclass(a) for a in get_args(hint))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, fields: Any, where: str) -> Any:
    """`cls(**fields)` after checking every field against its annotation; unknown fields are refused."""
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: fields are not a map")
    names, plan = _plan(cls)
    if not names.issuperset(fields):
        raise ProtocolError(f"{where}: unknown fields {sorted(set(fields) - names)}")
    wheres = _field_wheres.get((cls, where))
    if wheres is None:  # (the paths come from message classes and tags, never from a frame's content)
        wheres = _field_wheres[(cls, where)] = tuple(f"{where}.{name}" for name, _, _ in plan)
    values = {}
    for (name, check, required), field_where in zip(plan, wheres):
        if name in fields:
            values[name] = check(fields[name], field_where)
        elif required:
            raise ProtocolError(f"{where}: missing field {name!r}")
    return cls(**values)


_field_wheres: dict[tuple[type, str], tuple[str, ...]] = {}
"""Per (message class, path): each field's path for error messages, built once, not per field per receipt."""


Check = typing.Callable[[Any, str], Any]


@functools.cache
def _plan(cls: type) -> tuple[frozenset[str], tuple[tuple[str, Check, bool], ...]]:
    """Per message class, once: its field names and one compiled checker per field. Decoding is
    on every hot path (a KV hand-off decodes a message per chunk), so the annotations are
    interpreted here instead of on each receipt."""
    hints = _hints(cls)
    plan = tuple((f.name, _checker(hints[f.name]),
                  f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(cls))
    return frozenset(hints), plan


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate `value` against a type hint; return it (tuples from lists where declared)."""
    return _checker(hint)(value, where)


@functools.cache
def _checker(hint: Any) -> Check:
    """A function that validates a value against `hint` and returns it (tuples from lists
    where declared), raising ProtocolError naming `where`."""
    origin = get_origin(hint)
    if hint is Any:
        return lambda value, where: value
    if dataclasses.is_dataclass(hint):
        return lambda value, where: _build(hint, value, where)
    if origin in (Union, types.UnionType):
        options = [_checker(option) for option in get_args(hint)]
        optional = type(None) in get_args(hint)

        def check_union(value: Any, where: str) -> Any:
            if value is None and optional:  # most optional fields are unset: no failed check first
                return None
            for option in options:
                try:
                    return option(value, where)
                except ProtocolError:
                    continue
            raise ProtocolError(f"{where}: {type(value).__name__} does not match {hint}")
        return check_union
    if hint is type(None):
        def check_none(value: Any, where: str) -> None:
            if value is None:
                return None
            raise ProtocolError(f"{where}: expected null")
        return check_none
    if origin is typing.Literal:
        allowed = get_args(hint)

        def check_literal(value: Any, where: str) -> Any:
            if value in allowed:
                return value
            raise ProtocolError(f"{where}: {value!r} not one of {allowed}")
        return check_literal
    if origin in (list, tuple):
        args = get_args(hint)
        item_hint = args[0] if args else Any
        item = _checker(item_hint)
        as_tuple = origin is tuple

        def check_list(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
            if item_hint is int and _INT_ONLY.issuperset(map(type, value)):  # the common case, in C
                return tuple(value) if as_tuple else value
            checked = [item(v, where) for v in value]
            return tuple(checked) if as_tuple else checked
        return check_list
    if origin is dict:
        key, val = (_checker(h) for h in (get_args(hint) or (Any, Any)))

        def check_dict(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
            return {key(k, where): val(v, where) for k, v in value.items()}
        return check_dict
    if hint is float:
        def check_float(value: Any, where: str) -> float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
        return check_float
    if hint is int:
        def check_int(value: Any, where: str) -> int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
        return check_int
    if hint in (str, bool, bytes):
        def check_exact(value: Any, where: str) -> Any:
            if type(value) is hint:
                return value
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return check_exact

    def unsupported(value: Any, where: str) -> Any:
        raise ProtocolError(f"{where}: unsupported field type {hint}")
    return unsupported
