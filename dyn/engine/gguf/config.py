"""GGUF metadata -> a Hugging Face `config.json` for the Llama family (Llama, Qwen 2, Qwen 3).

llama.cpp stores the same hyperparameters under `<arch>.*` keys; this maps
them to the names transformers and dyn's loader read.
"""

from __future__ import annotations

from typing import Any

from dyn.engine.gguf.reader import GGUFFile
from dyn.engine.loader import CheckpointError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""GGUF `general.architecture` -> HF architecture this module can describe."""

PAIRED_ROPE = frozenset({"llama"})
"""Architectures whose q/k rows llama.cpp's converter interleaves for its pairwise RoPE (Qwen's run
NEOX-style RoPE there, halves as in HF, so their rows are stored as HF has them)."""


def hf_config(gguf: GGUFFile, *, torch_dtype: str) -> dict[str, Any]:
    """config.json content for `gguf`; raises CheckpointError for anything dyn cannot serve."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})", path=gguf.path)
    scaling = gguf.arch("rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"rope scaling {scaling!r} is not supported for GGUF checkpoints", path=gguf.path)
    if "rope_freqs.weight" in gguf.tensor_names():
        raise CheckpointError("per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not "
                              "supported for GGUF checkpoints", path=gguf.path)
    hidden = int(gguf.require_arch("embedding_length"))
    heads = int(gguf.require_arch("attention.head_count"))
    kv_heads = int(gguf.arch("attention.head_count_kv", heads))
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    vocab = int(gguf.arch("vocab_size", len(tokens)))
    if vocab <= 0:
        raise CheckpointError("no vocab_size and no tokenizer.ggml.tokens", path=gguf.path)
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    eos = gguf.get("tokenizer.ggml.eos_token_id")
    pad = gguf.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(gguf.require_arch("feed_forward_length")),
        "num_hidden_layers": int(gguf.require_arch("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        # (Qwen 3's head is not hidden / heads: 128 for Qwen3-0.6B's 1024 / 16; key_length says so)
        "head_dim": int(gguf.arch("attention.key_length", gguf.arch("rope.dimension_count", hidden // heads))),
        "max_position_embeddings": int(gguf.arch("context_length", 4096)),
        "rms_norm_eps": float(gguf.arch("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(gguf.arch("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensor_names(),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        **({"bos_token_id": int(bos)} if bos is not None else {}),
        **({"eos_token_id": int(eos)} if eos is not None else {}),
        **({"pad_token_id": int(pad)} if pad is not None else {}),
    }
