"""A small schema walker: YAML mappings -> frozen dataclasses, with located errors.

The dataclasses in dyn.config.topology/recipe are the schema. Each field's
annotation decides what a value may be (int, float, bool, str, Literal,
optional, tuple, nested dataclass); unknown keys get a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from dyn.config.yamlmap import LocatedDoc, type_name


def build(cls: type, data: Any, path: str, doc: LocatedDoc, *, skip: frozenset[str] = frozenset(),
          extra: dict[str, Any] | None = None) -> Any:
    """Build dataclass `cls` from mapping `data` found at `path`.

    `skip` names fields the file may not set (filled by the loader);
    `extra` supplies values for fields the caller has already decided.
    """
    if not isinstance(data, dict):
        raise doc.error(path, f"expected a mapping of keys, got {type_name(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.init and not f.name.startswith("_") and f.name not in skip}
    check_keys(data, fields, path, doc)
    kwargs: dict[str, Any] = dict(extra or {})
    for name, f in fields.items():
        if name in kwargs:
            continue
        child = join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], child, doc)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise doc.error(path, f"missing required key '{name}'", hint=f"add `{name}:` here")
    return cls(**kwargs)


def check_keys(data: dict[str, Any], allowed: typing.Iterable[str], path: str, doc: LocatedDoc) -> None:
    """Reject keys outside `allowed`, suggesting the closest valid one."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise doc.error(join(path, key), f"unknown key '{key}'", hint=suggest(key, allowed))


def convert(hint: Any, value: Any, path: str, doc: LocatedDoc) -> Any:
    """Check `value` against annotation `hint`; return it in dataclass form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, path, doc)
        raise AssertionError(f"unsupported union {hint}")
    if value is None:
        raise doc.error(path, "must not be empty (null)", hint="give a value or delete the key")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise doc.error(path, f"must be one of {choices}; got {value!r}",
                            hint=suggest(str(value), [str(a) for a in args], "choices"))
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise doc.error(path, f"expected a list, got {type_name(value)}")
        return tuple(convert(args[0], item, f"{path}[{i}]", doc) for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, doc)
    return _scalar(hint, value, path, doc)


def suggest(word: str, choices: list[str], what: str = "keys") -> str:
    """A did-you-mean, else the valid choices (a short list) or how many there are."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if not choices:
        return "remove it"
    if len(choices) > 12:
        return f"{len(choices)} valid {what}, e.g. {', '.join(choices[:3])}"
    return f"valid {what}: " + ", ".join(sorted(choices))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


MAX_INT = 2**63 - 1
"""Numbers travel in msgpack and JSON to other processes; larger ones are typos."""


def _scalar(hint: Any, value: Any, path: str, doc: LocatedDoc) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise doc.error(path, f"expected true or false, got {type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"expected an integer, got {type_name(value)} {value!r}")
        if abs(value) > MAX_INT:
            raise doc.error(path, f"{value} is out of range (at most {MAX_INT} in magnitude)")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise doc.error(path, f"expected a number, got {type_name(value)} {value!r}")
        if not math.isfinite(value) or abs(value) > MAX_INT:
            raise doc.error(path, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise doc.error(path, f"expected a string, got {type_name(value)} {value!r}",
                            hint="quote it if it is meant as text")
        return value
    raise AssertionError(f"unsupported annotation {hint!r} at {path}")
