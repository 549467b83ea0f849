"""SmolLM2-135M-Instruct from its GGUF: dyn's conversion and torch engine against transformers' GGUF loader.

transformers dequantizes with the same ggml reference code and un-permutes q/k
itself, so its model is an independent reading of the file: the weights must
be identical, and the engine's logits equal to float32 rounding.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.gguf.cache import STAMP, cached_conversion  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402

DECODE_STEPS = 20
ATOL = 5e-4
"""float32 over 30 layers: SDPA's fused kernel and chunked prefill sum in a different order than transformers'
eager attention; measured max difference 4e-5..7e-5 on logits of magnitude ~20 (about 5x headroom). A wrong
weight, q/k permutation or mask moves logits by more than 0.1."""


def test_weights_equal_transformers_gguf_loading(smollm2_dir, smollm2_reference):
    from safetensors.torch import load_file

    ours = load_file(str(smollm2_dir / "model.safetensors"))
    ref = smollm2_reference.state_dict()
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied embeddings: transformers lists the alias
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == \
        (30, 576, 9, 3, 49152, True)


def test_engine_logits_match_transformers_with_chunked_prefill(smollm2_dir, smollm2_reference):
    runner = TorchModelRunner.from_pretrained(smollm2_dir, dtype="float32", block_size=16, num_blocks=64,
                                              max_context=512)
    runner.capture_logits = True
    tok = Tokenizer.from_dir(smollm2_dir)
    texts = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers and explain why each one is prime. " * 3, "Hi"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in texts]
    # 48 tokens per step: the long prompts prefill in chunks while the short ones already decode
    engine = Engine(runner, max_batch_size=8, max_num_batched_tokens=48)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, SamplingParams(max_tokens=DECODE_STEPS + 1,
                                                                    ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert max(len(c) for c in runner.captured_logits["r2"]) <= 48 < len(prompts[2])
    for i, prompt in enumerate(prompts):
        generated = tokens[f"r{i}"]
        assert len(generated) == DECODE_STEPS + 1
        ours = torch.cat(runner.captured_logits[f"r{i}"])
        with torch.no_grad():
            ref = smollm2_reference(torch.tensor([prompt + generated[:-1]])).logits[0].float()
        ref = ref[-ours.shape[0]:]  # the shared system prompt came from the prefix cache: compare the rest
        err = (ours - ref).abs().max().item()
        assert err < ATOL, f"r{i}: max |logit diff| {err:.2e}"
        assert ref[-len(generated):].argmax(-1).tolist() == generated, f"r{i}: greedy tokens differ"
    assert "Paris" in tok.decode(tokens["r0"])


def test_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    """The cache's bookkeeping (the conversion itself is the test above's): a stand-in converter
    writes a marker file instead of dequantizing 135M parameters twice."""
    converted: list[str] = []

    def convert(source, target, *, dtype):
        target.mkdir()
        (target / "model.safetensors").write_bytes(source.read_bytes()[:64])
        converted.append(dtype)

    monkeypatch.setattr("dyn.engine.gguf.cache.convert_gguf", convert)
    copy = tmp_path / "model.gguf"
    copy.write_bytes(b"GGUF" + bytes(252))
    first = cached_conversion(copy, dtype="bfloat16", cache_root=tmp_path / "cache")
    built = (first / "model.safetensors").stat().st_mtime_ns
    again = cached_conversion(copy, dtype="bfloat16", cache_root=tmp_path / "cache")
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == built
    stamp = json.loads((first / STAMP).read_text())
    assert stamp["size"] == copy.stat().st_size and stamp["dtype"] == "bfloat16"
    os.utime(copy, ns=(stamp["mtime_ns"] + 10**9, stamp["mtime_ns"] + 10**9))
    (first.parent / f"{first.name}.tmp-999999").mkdir()  # a converter that died mid-way
    rebuilt = cached_conversion(copy, dtype="bfloat16", cache_root=tmp_path / "cache")
    assert rebuilt == first and (rebuilt / "model.safetensors").stat().st_mtime_ns != built
    assert not list((tmp_path / "cache" / "gguf").glob("*.tmp-*"))
    assert converted == ["bfloat16", "bfloat16"]  # built, reused, rebuilt
