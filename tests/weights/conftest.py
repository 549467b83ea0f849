"""Shared fixture: one tiny checkpoint per module (the weight peers and the tests load it)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from dyn.engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=7)
