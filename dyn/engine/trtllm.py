"""TensorRT-LLM adapter: not available in this build (use `engine: vllm`).

This module only makes the failure clear; no shipped recipe uses it. It imports
tensorrt_llm lazily so that nothing CUDA-only loads on CPU hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dyn.errors import EngineError

if TYPE_CHECKING:
    from dyn.config.recipe import ModelSpec, WorkerGroup


def create_trtllm_engine(model_spec: "ModelSpec", group: "WorkerGroup", *, device: str,
                         kv_memory_bytes: int | None = None) -> object:
    """Raise EngineError: why the trtllm engine cannot start here, and what to use instead."""
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"engine 'trtllm' needs the tensorrt_llm package, which is not importable here "
                          f"({exc}), and the TensorRT-LLM adapter is not available in this build; "
                          f"use engine 'vllm' (GPUs, dyn[vllm]) or 'torch'") from None
    raise EngineError(f"engine 'trtllm' for {model_spec.path} on {device}: the TensorRT-LLM adapter "
                      f"is not available in this build; use engine 'vllm' or 'torch'")
