"""YAML to plain values plus a line for every key path.

PyYAML's loader forgets where values came from; we compose the node graph
ourselves so every error can name `file:line`. Paths look like
`racks[0].nodes[1].name`; lines are 1-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from dyn.errors import ConfigError


@dataclass(frozen=True)
class LocatedDoc:
    """A parsed document: plain Python values and where each path starts."""

    data: Any
    lines: dict[str, int]
    source: str

    def line(self, path: str) -> int | None:
        """Line of `path`, else of its nearest located parent."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = _parent(path)
        return self.lines.get("", 1)

    def error(self, path: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, path=self.source, line=self.line(path), field=path or None, hint=hint)


def parse_yaml(text: str, source: str) -> LocatedDoc:
    """Parse one YAML document whose top level must be a mapping."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses NUL and control characters here
        root = loader.get_single_node()
        if root is None:
            raise ConfigError("the file is empty", path=source, line=1,
                              hint="start from one of the shipped examples")
        lines: dict[str, int] = {}
        data = _walk(loader, root, "", lines, source, [MAX_VALUES])
    except RecursionError:
        # PyYAML composes recursively; the reader's position is where the nesting got too deep.
        line = loader.get_mark().line + 1 if loader is not None else None
        raise ConfigError("YAML nesting is too deep", path=source, line=line,
                          hint=f"nest at most {MAX_DEPTH} levels") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # An error found at end of file points past the last line; name the last line instead.
        line = min(mark.line + 1, max(1, len(text.splitlines()))) if mark else None
        problem = exc.problem or "invalid YAML"
        if exc.context and exc.context_mark:
            problem += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error: {problem}", path=source, line=line,
                          hint="check indentation, colons and quoting on this line") from None
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)  # ReaderError: a character YAML forbids
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
        raise ConfigError(f"YAML error: {exc}", path=source, line=line) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {type_name(data)}",
                          path=source, line=1)
    return LocatedDoc(data, lines, source)


def type_name(value: Any) -> str:
    """How an operator would call this YAML value."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


MAX_DEPTH = 64
MAX_VALUES = 200_000
"""Caps on one document: aliases can make a short file expand exponentially (a "YAML bomb")."""


def _walk(loader: yaml.SafeLoader, node: yaml.Node, path: str, lines: dict[str, int], source: str,
          budget: list[int], depth: int = 0) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        what = f"more than {MAX_VALUES} values" if budget[0] < 0 else f"nesting deeper than {MAX_DEPTH} levels"
        raise ConfigError(f"the document expands to {what}", path=source, line=node.start_mark.line + 1,
                          field=path or None, hint="check aliases (*name) and nesting here")
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, f"{path}[{i}]", lines, source, budget, depth + 1)
                for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.MappingNode)
    loader.flatten_mapping(node)  # resolve `<<: *anchor` merge keys
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise ConfigError(f"keys must be plain names, got {type_name(key)}", path=source, line=line,
                              field=path or None)
        child = f"{path}.{key}" if path else key
        if key in out:
            raise ConfigError(f"duplicate key '{key}' (first at line {lines[child]})", path=source,
                              line=line, field=child, hint="YAML keeps only the last one; remove one")
        lines[child] = line
        out[key] = _walk(loader, value_node, child, lines, source, budget, depth + 1)
        lines[child] = line  # the key's line, not its value's, names the field
    return out


def _parent(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""
