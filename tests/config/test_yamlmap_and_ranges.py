"""Line mapping of YAML key paths, and range expansion."""

from __future__ import annotations

import pytest

from dyn.config.ranges import RangeError, expand
from dyn.config.yamlmap import parse_yaml
from dyn.errors import ConfigError


def test_every_key_path_has_its_line() -> None:
    doc = parse_yaml("a: 1\nb:\n  c: [x, y]\n  d:\n    - e: 2\n", "f.yaml")
    assert doc.data == {"a": 1, "b": {"c": ["x", "y"], "d": [{"e": 2}]}}
    assert doc.lines["a"] == 1 and doc.lines["b.c"] == 3 and doc.lines["b.d[0].e"] == 5
    assert doc.line("b.d[0].missing") == 5  # falls back to the nearest parent


def test_merge_keys_are_resolved() -> None:
    doc = parse_yaml("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n", "f.yaml")
    assert doc.data["use"] == {"x": 1, "y": 2}


def test_duplicate_keys_are_errors_not_silently_dropped() -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert info.value.line == 3 and "first at line 1" in str(info.value)


def test_non_string_keys_are_rejected() -> None:
    with pytest.raises(ConfigError, match="keys must be plain names"):
        parse_yaml("1: a\n", "f.yaml")


@pytest.mark.parametrize("pattern, expected", [
    ("tray{01..03}", ["tray01", "tray02", "tray03"]),
    ("10.0.0.{9..11}", ["10.0.0.9", "10.0.0.10", "10.0.0.11"]),
    ("n{8..10}x", ["n8x", "n9x", "n10x"]),
    ("{0..1}", ["0", "1"]),
    ("plain", ["plain"]),
])
def test_expand(pattern: str, expected: list[str]) -> None:
    assert expand(pattern) == expected


@pytest.mark.parametrize("pattern, message", [
    ("n{3..1}", "counts down"),
    ("n{1..2}{1..2}", "2 ranges"),
    ("n{1..2", "unbalanced"),
    ("n{a..b}", "not a range"),
    ("n{1..99999}", "more than"),
])
def test_expand_rejects(pattern: str, message: str) -> None:
    with pytest.raises(RangeError, match=message):
        expand(pattern)
