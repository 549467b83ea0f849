"""Build the engine a recipe asks for; heavy engines are imported lazily.

`mock` needs neither torch nor a GPU; `torch` imports torch only when chosen;
`vllm` imports vLLM only when chosen; `trtllm` is not available in this build.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dyn.config.recipe import ModelSpec, WorkerGroup
from dyn.engine.backend import Backend
from dyn.engine.engine import Detokenize, Engine
from dyn.engine.mock import MockEngine
from dyn.errors import EngineError

_GIB = 1 << 30
DEFAULT_CPU_KV_BYTES = 2 * _GIB
"""CPU pool when the recipe gives no budget (capped at a quarter of free RAM)."""
CUDA_KV_FRACTION = 0.85
"""Share of free GPU memory (after weights) the pool takes when no budget is given."""


def create_engine(model_spec: ModelSpec, group: WorkerGroup, *, device: str,
                  kv_memory_bytes: int | None = None, cpu_threads: int | None = None,
                  fill_weights: Callable[[Any, Path], None] | None = None,
                  vllm_kwargs: dict[str, Any] | None = None,
                  detokenizers: dict[str, Detokenize | None] | None = None) -> Backend:
    """The engine for one worker of `group` on `device` ("cpu", "cuda", "cuda:N").

    `kv_memory_bytes` overrides `group.kv_memory_gib`; the mock sizes its pool
    from `model_spec.mock.num_kv_blocks` instead. `fill_weights(model)` (torch
    engine) fills the weight arena instead of reading the checkpoint (a peer);
    `path` is the checkpoint directory (a GGUF's converted one) for its disk fallback.
    `detokenizers`: the tokenizers this process already loaded, by checkpoint path, filled in
    here (mock workers hosted by one process share one: ~0.13 s each to load, on one thread).
    """
    if kv_memory_bytes is None and group.kv_memory_gib is not None:
        kv_memory_bytes = int(group.kv_memory_gib * _GIB)
    if kv_memory_bytes is not None and kv_memory_bytes <= 0:
        raise EngineError(f"KV memory budget must be positive, got {kv_memory_bytes} bytes")
    if model_spec.engine == "mock":
        return _mock_engine(model_spec, group, detokenizers)
    if model_spec.engine == "torch":
        return _torch_engine(model_spec, group, device, kv_memory_bytes, cpu_threads, fill_weights)
    if model_spec.engine == "vllm":
        from dyn.engine.vllm_args import engine_kwargs
        from dyn.engine.vllm_engine import VllmEngine  # lazy: optional extra

        return VllmEngine(vllm_kwargs if vllm_kwargs is not None else engine_kwargs(model_spec, group, device=device),
                          adapters=dict(model_spec.lora_adapters))
    if model_spec.engine == "trtllm":
        from dyn.engine.trtllm import create_trtllm_engine  # lazy: optional extra

        return create_trtllm_engine(model_spec, group, device=device,
                                    kv_memory_bytes=kv_memory_bytes)  # type: ignore[return-value]
    raise EngineError(f"unknown engine {model_spec.engine!r}; expected torch, vllm, trtllm or mock")


def _mock_engine(spec: ModelSpec, group: WorkerGroup,
                 detokenizers: dict[str, Detokenize | None] | None = None) -> MockEngine:
    vocab_size, eos = 32000, (2,)
    if (Path(spec.path) / "config.json").is_file():
        from dyn.engine.loader import read_model_config  # torch-free JSON parsing
        config = read_model_config(spec.path)
        vocab_size, eos = config.vocab_size, config.eos_token_ids or eos
    return MockEngine(spec.mock, block_size=spec.block_size, vocab_size=vocab_size,
                      eos_token_ids=tuple(eos), max_context=spec.max_context,
                      max_batch_size=group.max_batch_size,
                      max_num_batched_tokens=group.max_num_batched_tokens,
                      detokenize=_detokenizer(spec.path, detokenizers), clock="live")


def _torch_engine(spec: ModelSpec, group: WorkerGroup, device: str, kv_memory_bytes: int | None,
                  cpu_threads: int | None, fill_weights: Callable[[Any, Path], None] | None = None) -> Engine:
    import torch  # lazy: only torch workers pay for it

    from dyn.engine.torch_runner import TorchModelRunner

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available here")
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)  # this process is one worker: its threads are ours
    from dyn.engine.sources import resolve_checkpoint

    path = str(resolve_checkpoint(spec.path, dtype=spec.dtype))  # a GGUF: converted once, then cached
    if kv_memory_bytes is None:
        kv_memory_bytes = _default_kv_bytes(torch, path, device)
    runner = TorchModelRunner.from_pretrained(
        path, dtype=spec.dtype, device=device, block_size=spec.block_size,
        kv_memory_bytes=kv_memory_bytes, max_context=spec.max_context, fill_weights=fill_weights)
    return Engine(runner, max_batch_size=group.max_batch_size,
                  max_num_batched_tokens=group.max_num_batched_tokens,
                  detokenize=_detokenizer(path), grammars=_grammars(path, runner))


def _grammars(path: str, runner: Any) -> Callable[[], Any] | None:
    """What builds the engine's structured-output compiler on first use (needs the tokenizer)."""
    if not (Path(path) / "tokenizer.json").is_file():
        return None

    def build() -> Any:
        from dyn.engine.grammar import Grammars  # lazy: xgrammar and transformers take seconds

        return Grammars(path, runner.vocab_size, runner.eos_token_ids)
    return build


def _default_kv_bytes(torch: Any, model_dir: str, device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        budget = int((free - weights) * CUDA_KV_FRACTION)
        if budget <= 0:
            raise EngineError(f"{device}: {free / _GIB:.1f} GiB free cannot hold the weights "
                              f"({weights / _GIB:.1f} GiB) plus a KV pool; set kv_memory_gib "
                              "or free the GPU")
        return budget
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CPU_KV_BYTES
    return max(1, min(DEFAULT_CPU_KV_BYTES, available // 4))


def _detokenizer(path: str, loaded: dict[str, Detokenize | None] | None = None) -> Detokenize | None:
    """The checkpoint tokenizer's decode, for stop strings; None when there is none. Taken from,
    and added to, `loaded` when given."""
    if loaded is not None and path in loaded:
        return loaded[path]
    decode = None
    if (Path(path) / "tokenizer.json").is_file():
        from dyn.engine.tokenizer import load_tokenizer  # lazy: loads `tokenizers`

        decode = load_tokenizer(path).decode
    if loaded is not None:
        loaded[path] = decode
    return decode
