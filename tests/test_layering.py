"""Imports between dyn's packages point one way (STYLE.md, DESIGN.md "Layout").

Each package has a layer; a module may import its own package and any package of a
lower layer. Type-only back-references under `if TYPE_CHECKING:` are allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

DYN = Path(__file__).resolve().parents[1] / "dyn"

# cli -> deploy/planner/frontend/worker -> router, kv, shuttle, engine, launch
#     -> control, topology, config, errors
LAYER = {
    "errors": 0, "logs": 0,
    "config": 1,
    "topology": 2, "control": 2,
    "launch": 3, "metrics": 3, "kv": 3,
    "engine": 4, "shuttle": 4,
    "router": 5, "weights": 5,
    "planner": 6, "frontend": 6, "worker": 6,
    "deploy": 7, "bench": 7,
    "sim": 8, "dashboard": 8,
    "cli": 9,
}
TOP_LEVEL = {"__init__", "__main__"}


def _package_of(path: Path) -> str:
    parts = path.relative_to(DYN).parts
    return parts[0] if len(parts) > 1 else ("cli" if path.stem in TOP_LEVEL else path.stem)


def _imported_packages(tree: ast.Module) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    type_only = {id(node) for stmt in ast.walk(tree) if _is_type_checking_block(stmt)
                 for node in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                 else [])
        found += [(name.split(".")[1], node.lineno) for name in names
                  if name.startswith("dyn.") and name.count(".") >= 1]
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in DYN.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in DYN.glob("*.py") if p.stem not in TOP_LEVEL}
    assert packages <= set(LAYER), f"give these packages a layer: {sorted(packages - set(LAYER))}"


def test_no_import_points_up_or_sideways() -> None:
    wrong = []
    for path in sorted(DYN.rglob("*.py")):
        source = _package_of(path)
        for target, line in _imported_packages(ast.parse(path.read_text(), str(path))):
            if target != source and LAYER[target] >= LAYER[source]:
                wrong.append(f"{path.relative_to(DYN.parent)}:{line}: {source} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
