"""Numeric range patterns: `tray{01..18}` -> tray01 ... tray18.

One `{first..last}` group per value keeps 18 trays to one line; a leading
zero on `first` pads every number to its width. Descending or non-numeric
ranges are errors, not guesses.
"""

from __future__ import annotations

import re

MAX_RANGE = 4096
"""More nodes than this in one entry is almost certainly a typo."""

_GROUP = re.compile(r"\{([^{}]*)\}")
_BOUNDS = re.compile(r"^(\d+)\.\.(\d+)$")


class RangeError(ValueError):
    """A pattern is malformed; the message says how."""


def has_range(value: str) -> bool:
    return "{" in value or "}" in value


def expand(pattern: str) -> list[str]:
    """All values of `pattern`, in order; a plain string gives itself."""
    groups = list(_GROUP.finditer(pattern))
    stray = _GROUP.sub("", pattern)
    if "{" in stray or "}" in stray:
        raise RangeError(f"unbalanced or nested braces in {pattern!r}")
    if not groups:
        return [pattern]
    if len(groups) > 1:
        raise RangeError(f"{pattern!r} has {len(groups)} ranges; use one {{first..last}} per value")
    group = groups[0]
    bounds = _BOUNDS.match(group.group(1).strip())
    if not bounds:
        raise RangeError(f"{{{group.group(1)}}} in {pattern!r} is not a range like {{01..18}}")
    first_text, last_text = bounds.groups()
    first, last = int(first_text), int(last_text)
    if last < first:
        raise RangeError(f"range {{{first_text}..{last_text}}} in {pattern!r} counts down; write {{{last_text}..{first_text}}}")
    count = last - first + 1
    if count > MAX_RANGE:
        raise RangeError(f"range in {pattern!r} has {count} values, more than {MAX_RANGE}")
    width = len(first_text) if first_text.startswith("0") and len(first_text) > 1 else 0
    head, tail = pattern[:group.start()], pattern[group.end():]
    return [f"{head}{n:0{width}d}{tail}" for n in range(first, last + 1)]


def compact_ranges(values: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 3, 6] -> "0-3,6" (the reverse direction, for tables of GPU indices)."""
    parts: list[str] = []
    items = sorted(values)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
