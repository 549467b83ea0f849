"""`dyn up` of the tiny torch model, then the official openai client: the serving acceptance test.

Disaggregated (prefill -> KV shuttle -> decode) and aggregated deployments
must give the same greedy tokens as Hugging Face transformers on the same
checkpoint, for prompts short enough to prefill locally and long enough to
go through the prefill worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import openai
import pytest

from dyn.config.recipe import ModelSpec
from dyn.frontend.text import load_tokenizer
from sshd import free_port

ROOT = Path(__file__).resolve().parents[2]
DYN = str(ROOT / ".venv" / "bin" / "dyn")
NUM_PROMPTS = 20
MAX_TOKENS = 8


class Deployment:
    def __init__(self, tmp: Path, mode: str, model_dir: Path) -> None:
        self.port = free_port()
        self.name = f"torch-{mode[:3]}"
        text = (ROOT / "recipes" / "tiny-local.yaml").read_text()
        text = text.replace("port: 8000", f"port: {self.port}").replace(
            "~/.cache/dyn/models/tiny-llama", str(model_dir)).replace("name: tiny-local", f"name: {self.name}")
        if mode == "aggregated":
            workers = text[text.index("workers:"):text.index("router:")]
            text = text.replace("mode: disaggregated", "mode: aggregated").replace(
                workers, "workers:\n  both: {replicas: 1, max_batch_size: 16, max_num_batched_tokens: 512}\n")
        self.recipe = tmp / f"{self.name}.yaml"
        self.recipe.write_text(text)
        self.env = {**os.environ, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes")}
        self.pids: list[int] = []

    def dyn(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        result = self.dyn("up", "-t", str(ROOT / "topologies" / "local.yaml"), "-r", str(self.recipe),
                          "--name", self.name)
        assert result.returncode == 0, result.stdout + result.stderr
        status = json.loads(self.dyn("status", "--name", self.name, "--json").stdout)
        self.pids = [w["pid"] for w in status["workers"] if w.get("pid")] + [status["daemon"]["pid"]]

    def down(self) -> None:
        self.dyn("down", "--name", self.name, timeout=60)
        for pid in self.pids:  # belt and braces: nothing of ours outlives the test
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _prompts(vocab: int) -> list[list[int]]:
    """20 prompts from 3 to 300 tokens; some share a prefix so the cache is hit too."""
    lengths = [3, 5, 9, 16, 17, 31, 33, 40, 64, 65, 80, 100, 120, 150, 180, 200, 230, 256, 280, 300]
    shared = [(i * 17 + 11) % (vocab - 10) + 5 for i in range(300)]
    prompts = []
    for k, n in enumerate(lengths):
        tail_start = n // 2 if k % 3 == 0 else 0
        prompts.append(shared[:tail_start] + [(i * 31 + k * 7) % (vocab - 10) + 5 for i in range(n - tail_start)])
    return prompts


def _hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from dyn.engine.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    write_tiny_checkpoint(path, seed=0)
    return path


def _serve_texts(url: str, prompts: list[list[int]]) -> list[str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    return [client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
            for prompt in prompts]


@pytest.mark.e2e
def test_disaggregated_and_aggregated_match_transformers(tmp_path, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    prompts = _prompts(config["vocab_size"])
    tokenizer = load_tokenizer(ModelSpec(path=str(model_dir)))
    # The frontend detokenizes the same way: equal text means equal tokens (random tokens are
    # almost never decoded to the same text by two different id sequences).
    expected = [tokenizer.decode(ids) for ids in _hf_greedy(model_dir, prompts)]
    for mode in ("disaggregated", "aggregated"):
        deployment = Deployment(tmp_path, mode, model_dir)
        try:
            deployment.up()
            got = _serve_texts(deployment.url, prompts)
            for i, (want, have) in enumerate(zip(expected, got)):
                assert have == want, f"{mode}: prompt {i} ({len(prompts[i])} tokens)"
            if mode == "disaggregated":
                _check_openai_client(deployment.url)
        finally:
            deployment.down()


def _check_openai_client(url: str) -> None:
    """Chat and completions, sync and async, streaming and not: usage and stop strings hold."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="tiny-llama", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hello there"}])
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 3
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    full = client.completions.create(model="tiny-llama", prompt="abc " * 20, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 and text
    stop = text[len(text) // 2:][:2]
    if stop.strip():
        stopped = client.completions.create(model="tiny-llama", prompt="abc " * 20, max_tokens=12,
                                            temperature=0, stop=[stop], extra_body={"ignore_eos": True})
        assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
        assert text.startswith(stopped.choices[0].text)

    stream = client.completions.create(model="tiny-llama", prompt="abc " * 20, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    async def concurrent_chats() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

        async def one(i: int) -> str:
            stream = await aclient.chat.completions.create(
                model="tiny-llama", max_tokens=5, temperature=0, stream=True,
                messages=[{"role": "user", "content": f"question {i} " * (i + 1)}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            await aclient.close()

    assert all(isinstance(t, str) for t in asyncio.run(concurrent_chats()))
