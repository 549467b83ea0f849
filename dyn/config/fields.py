"""Small located-value checks shared by the topology parser.

Each takes the document, the raw mapping and where the key lives, and
returns the checked value or raises a ConfigError on that line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from dyn.config.schema import join
from dyn.config.topology import LOCAL_ADDRESS
from dyn.config.yamlmap import LocatedDoc, type_name

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
Where = Callable[[str], str]


def checked_name(doc: LocatedDoc, data: dict[str, Any], key: str, path: str) -> str:
    if key not in data:
        raise doc.error(path, f"missing required key '{key}'", hint=f"add `{key}:`")
    value = data[key]
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise doc.error(join(path, key), f"{value!r} is not a valid name (letters, digits, '.', '_', '-')")
    return value


def entries(doc: LocatedDoc, data: dict[str, Any], key: str, path: str, *, required: bool) -> list[Any]:
    value = data.get(key)
    if value is None or value == []:
        if required:
            raise doc.error(join(path, key) if key in data else path, f"'{key}' must list at least one entry")
        return []
    if not isinstance(value, list):
        raise doc.error(join(path, key), f"expected a list, got {type_name(value)}")
    return value


def unique(doc: LocatedDoc, seen: dict[str, str], name: str, path: str, what: str) -> None:
    if name in seen:
        raise doc.error(path, f"duplicate {what} name '{name}' (first at line {doc.line(seen[name])})")
    seen[name] = path


def text(doc: LocatedDoc, v: dict[str, Any], key: str, where: Where) -> str:
    value = v.get(key)
    if not isinstance(value, str) or not value:
        raise doc.error(where(key), f"expected a non-empty string, got {type_name(value)} {value!r}")
    return value


def opt_text(doc: LocatedDoc, v: dict[str, Any], key: str, where: Where) -> str | None:
    return None if v.get(key) is None else text(doc, v, key, where)


def local_file(doc: LocatedDoc, v: dict[str, Any], key: str, where: Where) -> str | None:
    value = opt_text(doc, v, key, where)
    return os.path.expanduser(value) if value else None  # files on the operator's machine


def disk_path(value: str | None, address: str) -> str | None:
    """`~` means this machine's home only for local nodes; remote nodes expand it themselves."""
    return os.path.expanduser(value) if value and address == LOCAL_ADDRESS else value


def number(doc: LocatedDoc, v: dict[str, Any], key: str, where: Where, default: float | None,
            *, minimum: float) -> float | None:
    value = v.get(key, default)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not minimum <= value <= 2**63):
        raise doc.error(where(key), f"expected a number >= {minimum:g}, got {value!r}")
    return float(value)

