"""Write a GGUF file out as a standard Hugging Face checkpoint directory.

The directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) loads in transformers, vLLM
and dyn's torch engine alike, so every engine serves one set of files.
"""

from __future__ import annotations

import json
from pathlib import Path

from dyn.engine.gguf.config import PAIRED_ROPE, hf_config
from dyn.engine.gguf.reader import GGUFFile
from dyn.engine.gguf.tensors import iter_hf_tensors
from dyn.engine.gguf.tokenizer import build_tokenizer
from dyn.engine.loader import CheckpointError

DTYPES = ("float32", "bfloat16", "float16")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Dequantize `gguf_path` to `dtype` and write the HF directory `out_dir` (created); return it."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported for conversion ({', '.join(DTYPES)})")
    gguf = GGUFFile(gguf_path)
    config = hf_config(gguf, torch_dtype=dtype)
    tok = build_tokenizer(gguf)  # before the weights: a bad vocabulary fails in milliseconds
    torch_dtype = getattr(torch, dtype)
    tensors = {t.name: torch.from_numpy(t.values).to(torch_dtype)
               for t in iter_hf_tensors(gguf, num_heads=config["num_attention_heads"],
                                        num_kv_heads=config["num_key_value_heads"],
                                        paired_rope=gguf.architecture in PAIRED_ROPE)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf.path.name})
    _write_json(out / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "tokenizer_config.json", tok.config)
    (out / "tokenizer.json").write_text(tok.tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    return out


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
