"""GGUF tensors -> float tensors under Hugging Face names, in HF layout (Llama, Qwen 2, Qwen 3).

Dequantization is `gguf.quants.dequantize`, ggml's own numpy port of its block
formats: the exact reference for every quant type, kept in step with llama.cpp
by its authors, where hand-written decoders would drift.

For Llama, llama.cpp's converter permutes the rows of q and k so that its RoPE
can rotate adjacent pairs (x0, x1), while HF Llama rotates halves (x_i,
x_{i+d/2}). `_unpermute` undoes that, per head (Qwen's are stored unpermuted):

    GGUF rows of one head:  [r0, r(d/2), r1, r(d/2+1), ...]   (pairs interleaved)
    HF rows of one head:    [r0, r1, ..., r(d/2-1), r(d/2), ...]
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

import numpy as np

from dyn.engine.gguf.reader import GGUFFile
from dyn.engine.loader import CheckpointError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
"""ggml types dyn dequantizes (a tested list; gguf knows more, but dyn has no test for them)."""

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # (Qwen 2)
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # (Qwen 3)
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


class HFTensor(NamedTuple):
    name: str
    """Hugging Face name (model.layers.0.self_attn.q_proj.weight)."""
    gguf_name: str
    values: np.ndarray
    """float32, HF shape ([out, in] for a matrix)."""


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a Llama-family GGUF tensor; None when dyn does not know it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def dequantize(gguf: GGUFFile, tensor) -> np.ndarray:  # tensor: gguf.ReaderTensor
    """float32 values of one tensor, shaped [rows, cols] (GGUF lists dims innermost first)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"quantization type {kind} is not supported (supported: "
                              f"{', '.join(SUPPORTED_TYPES)}); re-quantize the file with llama.cpp's "
                              f"llama-quantize to one of them", path=gguf.path, tensor=tensor.name)
    values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.array(values, dtype=np.float32, order="C").reshape(shape)  # a copy: F32 data is a read-only memmap


def iter_hf_tensors(gguf: GGUFFile, *, num_heads: int, num_kv_heads: int,
                    paired_rope: bool = True) -> Iterator[HFTensor]:
    """Every weight of the file, dequantized, renamed and, with `paired_rope` (config.PAIRED_ROPE),
    its q and k rows un-permuted, one at a time."""
    for tensor in gguf.reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError("tensor not part of a Llama-family checkpoint dyn can load", path=gguf.path,
                                  tensor=tensor.name)
        values = dequantize(gguf, tensor)
        if paired_rope and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            values = _unpermute(values, num_heads)
        elif paired_rope and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            values = _unpermute(values, num_kv_heads)
        yield HFTensor(name, tensor.name, values)


def _unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    rows = weights.shape[0]
    half = rows // num_heads // 2
    return np.ascontiguousarray(
        weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape))
