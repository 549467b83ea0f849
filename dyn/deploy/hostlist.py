"""Slurm hostlists (`gpu[001-018]`, `a[1-2]b[1-2],login1`) expanded the way Slurm does.

`SLURM_JOB_NODELIST` and `scontrol` print node sets compressed. The rules
below are those of Slurm's hostlist.c, checked against `scontrol show
hostnames` (tests/deploy/test_hostlist.py holds the recorded outputs):

* commas separate hosts, except inside brackets, where they separate ranges;
* a range `lo-hi` pads every number to the width of `lo` as written
  (`[8-10]` -> 8, 9, 10; `[08-10]` -> 08, 09, 10; `[1-010]` -> 1 .. 10);
* several bracket groups in one host multiply out, the first one outermost
  (`a[1-2]b[1-2]` -> a1b1 a1b2 a2b1 a2b2);
* text after the last bracket (`n[1-3]x`), a descending or empty range and
  an unclosed bracket are errors; order and duplicates are kept.
"""

from __future__ import annotations

import itertools
import re

from dyn.errors import ConfigError

MAX_HOSTS = 65536
"""Slurm's own cap on one range; a larger list is a typo, not a cluster."""

_RANGE = re.compile(r"(\d+)(?:-(\d+))?\Z")


def expand_hostlist(text: str) -> list[str]:
    """Every host of a Slurm hostlist, in Slurm's order. Raises ConfigError on a bad list."""
    hosts: list[str] = []
    for item in _split_top(text.strip(), text):
        hosts.extend(_expand_item(item, text))
        if len(hosts) > MAX_HOSTS:
            raise ConfigError(f"hostlist {text!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def _split_top(text: str, whole: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"hostlist {whole!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"hostlist {whole!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"hostlist {whole!r}: unclosed '['")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, whole: str) -> list[str]:
    parts = re.split(r"\[([^\]]*)\]", item)
    # parts = [prefix, ranges, text, ranges, ..., tail]: literal text at even indices
    if len(parts) == 1:
        return [item]
    if parts[-1]:
        raise ConfigError(f"hostlist {whole!r}: text {parts[-1]!r} after the last ']' of {item!r} "
                          "(Slurm accepts none)")
    choices: list[list[str]] = []
    for idx, part in enumerate(parts[:-1]):
        choices.append([part] if idx % 2 == 0 else _numbers(part, whole))
    return ["".join(combo) for combo in itertools.product(*choices)]


def _numbers(spec: str, whole: str) -> list[str]:
    values: list[str] = []
    for piece in spec.split(","):
        match = _RANGE.match(piece.strip())
        if match is None:
            raise ConfigError(f"hostlist {whole!r}: invalid range {piece!r} (expected N or LO-HI)")
        lo_text, hi_text = match.group(1), match.group(2)
        lo = int(lo_text)
        hi = int(hi_text) if hi_text is not None else lo
        if hi < lo:
            raise ConfigError(f"hostlist {whole!r}: descending range {piece!r}")
        if hi - lo + 1 > MAX_HOSTS:
            raise ConfigError(f"hostlist {whole!r}: range {piece!r} holds more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return values
