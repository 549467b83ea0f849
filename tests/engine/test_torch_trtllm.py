"""The trtllm adapter fails clearly where TensorRT-LLM is absent."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from dyn.engine.trtllm import create_trtllm_engine
from dyn.errors import EngineError


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm installed")
def test_missing_tensorrt_llm_is_an_engine_error():
    spec = SimpleNamespace(path="/models/llama", engine="trtllm")
    with pytest.raises(EngineError, match="needs the tensorrt_llm package.*not available in this build.*use engine 'vllm'"):
        create_trtllm_engine(spec, SimpleNamespace(), device="cuda:0")


def test_importing_the_adapter_loads_nothing_cuda_only():
    import sys

    assert "tensorrt_llm" not in sys.modules
