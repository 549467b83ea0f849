"""Seeded mutations of the shipped topology and recipe files.

Each operator plants one kind of defect an operator could type (a wrong
value, a missing or duplicated line, a typo in a key, broken syntax, a bad
indent, a truncated file). A mutation may happen to leave the file valid;
the tests accept that but count how many files were refused.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY_FILES = sorted((ROOT / "topologies").glob("*.yaml"))
RECIPE_FILES = sorted((ROOT / "recipes").glob("*.yaml"))

KEY_LINE = re.compile(r"^(?P<indent>\s*(?:-\s+)?)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<value>[^#]*)(?P<comment>#.*)?$")

HOSTILE_VALUES = (
    "-1", "0", "-0.5", "1e309", ".inf", "-.inf", ".nan", "99999999999999999999999", "''", '""',
    "ünïcødé ☃ 名前", "[]", "{}", "null", "~", "true", "'x{1..}'", "'n{9..1}'", "'a{1..3}'", "'h{1..5000}'",
    "!!binary aGk=", "2024-01-01", "*undefined_alias", "0x1F", "1_000", "[1, [2, [3]]]",
    "{a: {b: c}}", "'" + "x" * 5000 + "'", "' '", "'../../etc/passwd'", "-", "!!python/object:os.system x",
    "'\\u0000'", "65536", "-65536", "0.0000001", "[0, 0, 1]", "[-1]", "[1.5]", "{gpus: 8}", "yes",
)
SYNTAX_BREAKS = (": :", "[", "]", '"', "'", "\t", "{", "}", "- - -", "&a", "*", "|", ">", "%", "@", "`",
                 "? ", ",", "!!", "\\", "\u00a0")


@dataclass(frozen=True)
class Mutant:
    source: str
    """A name for the mutated file that says what was done (`recipes/x.yaml~retype@12`)."""
    kind: str
    text: str


def mutants(files: list[Path], count: int, seed: int) -> list[Mutant]:
    """`count` mutated files, spread over `files` and the operators, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        path = files[i % len(files)]
        op = OPERATORS[(i // len(files)) % len(OPERATORS)]
        lines = path.read_text(encoding="utf-8").splitlines()
        kind, mutated, line_no = op(rng, lines)
        rel = path.relative_to(ROOT)
        out.append(Mutant(f"{rel}~{kind}@{line_no}", kind, "\n".join(mutated) + "\n"))
    return out


def _key_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if KEY_LINE.match(line) and not line.lstrip().startswith("#")]


def _content_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]


def _retype(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_key_lines(lines))
    m = KEY_LINE.match(lines[i])
    out = list(lines)
    out[i] = f"{m['indent']}{m['key']}: {rng.choice(HOSTILE_VALUES)}"
    return "retype", out, i + 1


def _delete(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_content_lines(lines))
    return "delete", lines[:i] + lines[i + 1:], i + 1


def _duplicate(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_key_lines(lines))
    return "duplicate", lines[:i + 1] + [lines[i]] + lines[i + 1:], i + 2


def _unknown_key(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_key_lines(lines))
    indent = KEY_LINE.match(lines[i])["indent"].replace("-", " ")
    key = rng.choice(["bogus", "replica", "gpu", "nvlinks", "hed", "enabled_", "ключ", "x" * 80])
    return "unknown-key", lines[:i + 1] + [f"{indent}{key}: 1"] + lines[i + 1:], i + 2


def _typo(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_key_lines(lines))
    m = KEY_LINE.match(lines[i])
    key = m["key"]
    j = rng.randrange(len(key))
    typo = key[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz_") + key[j + 1:]
    if typo == key:
        typo = key + "s"
    out = list(lines)
    out[i] = f"{m['indent']}{typo}:{m['value']}"
    return "typo", out, i + 1


def _syntax(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_content_lines(lines))
    line = lines[i]
    at = rng.randrange(len(line) + 1)
    out = list(lines)
    out[i] = line[:at] + rng.choice(SYNTAX_BREAKS) + line[at:]
    return "syntax", out, i + 1


def _indent(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    i = rng.choice(_content_lines(lines))
    out = list(lines)
    shift = rng.choice([-3, -2, -1, 1, 2, 3])
    out[i] = " " * max(0, len(lines[i]) - len(lines[i].lstrip()) + shift) + lines[i].lstrip()
    return "indent", out, i + 1


def _truncate(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    text = "\n".join(lines)
    cut = rng.randrange(len(text))
    kept = text[:cut].splitlines() or [""]
    return "truncate", kept, len(kept)


def _scalar_to_block(rng: random.Random, lines: list[str]) -> tuple[str, list[str], int]:
    """Turn a mapping's value into a list or a scalar into a mapping (wrong shape, valid YAML)."""
    i = rng.choice(_key_lines(lines))
    m = KEY_LINE.match(lines[i])
    out = list(lines)
    shape = rng.choice(["[{}]", "[[]]", "{x: [1]}", "[a, b]", "'scalar'"])
    out[i] = f"{m['indent']}{m['key']}: {shape}"
    return "reshape", out, i + 1


OPERATORS = (_retype, _delete, _duplicate, _unknown_key, _typo, _syntax, _indent, _truncate, _scalar_to_block)
