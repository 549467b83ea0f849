"""Model architectures by their Hugging Face `architectures` name."""

from __future__ import annotations

import torch

from dyn.engine.loader import SUPPORTED_ARCHITECTURES, CheckpointError, ModelConfig
from dyn.engine.models.llama import LlamaModel

# Qwen2 and Qwen3 are Llama with flags (biases, q/k norm) read from the config.
MODEL_CLASSES: dict[str, type[LlamaModel]] = {name: LlamaModel for name in SUPPORTED_ARCHITECTURES}


def build_model(config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                max_positions: int) -> LlamaModel:
    """An unloaded model for `config` (call `.load(checkpoint)` next)."""
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise CheckpointError(f"unknown architecture {config.architecture!r}; "
                              f"supported: {', '.join(MODEL_CLASSES)}")
    return cls(config, dtype=dtype, device=device, max_positions=max_positions)
