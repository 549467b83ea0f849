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
            _hints(cls)  # resolve the annotations now: a bad one fails at import, not on receipt

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
    """A dataclass as a map of its fields; nested dataclasses (e.g. SamplingParams) become maps too."""
    return {f.name: _fields(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, fields: Any, where: str) -> Any:
    """`cls(**fields)` after checking every field against its annotation; unknown fields are refused."""
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: fields are not a map")
    hints = _hints(cls)
    unknown = set(fields) - set(hints)
    if unknown:
        raise ProtocolError(f"{where}: unknown fields {sorted(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            values[f.name] = _check(fields[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {f.name!r}")
    return cls(**values)


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate `value` against a type hint; return it (tuples from lists where declared)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _check(value, option, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {type(value).__name__} does not match {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ProtocolError(f"{where}: expected null")
    if origin is typing.Literal:
        if value in get_args(hint):
            return value
        raise ProtocolError(f"{where}: {value!r} not one of {get_args(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        args = get_args(hint)
        item = args[0] if args else Any
        checked = [_check(v, item, where) for v in value]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = get_args(hint) or (Any, Any)
        return {_check(k, key_hint, where): _check(v, value_hint, where) for k, v in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
    if hint in (str, bool, bytes):
        if type(value) is hint:
            return value
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    raise ProtocolError(f"{where}: unsupported field type {hint}")
