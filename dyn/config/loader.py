"""Public entry points: read and validate topology and recipe files.

`parse_*` take text (the daemon receives files as text); `load_*` read a
path. `resolve_file` lets commands take `gb200-nvl72` for
`topologies/gb200-nvl72.yaml`. All failures are `ConfigError` with a line.
"""

from __future__ import annotations

from pathlib import Path

from dyn.config.recipe import Recipe
from dyn.config.recipe_file import recipe_from_doc
from dyn.config.topology import Topology
from dyn.config.topology_file import topology_from_doc
from dyn.config.yamlmap import parse_yaml
from dyn.errors import ConfigError

DEFAULT_TOPOLOGY = "local"
DEFAULT_RECIPE = "smollm2-local"
_KIND_DIRS = {"topology": "topologies", "recipe": "recipes"}


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Validate topology YAML text; `source` names it in error messages."""
    return topology_from_doc(parse_yaml(text, source))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; `source` names it in error messages."""
    return recipe_from_doc(parse_yaml(text, source))


def load_topology(path: str | Path) -> Topology:
    return parse_topology(_read(path), str(path))


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(_read(path), str(path))


def resolve_file(kind: str, value: str | None) -> Path:
    """A path as given, or a shipped name looked up in ./<dir> then the install's <dir>.

    kind is "topology" or "recipe"; None means the default (local / smollm2-local).
    """
    folder = _KIND_DIRS[kind]
    value = value or (DEFAULT_TOPOLOGY if kind == "topology" else DEFAULT_RECIPE)
    given = Path(value).expanduser()
    if given.exists() or "/" in value or value.endswith((".yaml", ".yml")):
        return given
    roots = (Path.cwd() / folder, Path(__file__).resolve().parents[2] / folder)
    for root in roots:
        candidate = root / f"{value}.yaml"
        if candidate.exists():
            return candidate
    shipped = sorted({p.stem for root in roots if root.is_dir() for p in root.glob("*.yaml")})
    raise ConfigError(f"no {kind} file or shipped {kind} named '{value}'", path=value,
                      hint=f"shipped: {', '.join(shipped)}" if shipped else f"pass a path to a {kind} YAML file")


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", path=str(path), hint="check the path") from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from None
