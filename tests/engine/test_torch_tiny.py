"""`dyn model init tiny`: deterministic files that transformers and our engine both load."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from dyn.cli.main import app  # noqa: E402
from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.tiny import write_tiny_checkpoint  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = _files(write_tiny_checkpoint(tmp_path / "a", seed=7))
    b = _files(write_tiny_checkpoint(tmp_path / "b", seed=7))
    c = _files(write_tiny_checkpoint(tmp_path / "c", seed=8))
    assert set(a) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json"}
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_cli_writes_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["model", "init", "tiny", str(tmp_path / "m"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "m") == _files(write_tiny_checkpoint(tmp_path / "ref", seed=3))
    bad = CliRunner().invoke(app, ["model", "init", "huge", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "only 'tiny'" in bad.output


def test_transformers_loads_it_and_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_tiny_checkpoint(tmp_path / "m", seed=1)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) < 1_000_000
    runner = TorchModelRunner.from_pretrained(path, block_size=16, num_blocks=8, max_context=128)
    runner.capture_logits = True
    tok = Tokenizer.from_dir(path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello there"}]),
                        add_special_tokens=False)
    engine = Engine(runner)
    engine.add_request(EngineRequest("a", prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
    tokens = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens[:-1]])).logits[0]
    ours = torch.cat(runner.captured_logits["a"])
    assert (ours - ref).abs().max().item() < 1e-4
    assert isinstance(tok.decode(tokens), str)
    assert set(runner.eos_token_ids) == set(tok.eos_token_ids)


def test_bfloat16_smoke(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", seed=2, hidden_size=128, num_heads=4, num_kv_heads=2)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        runner = TorchModelRunner.from_pretrained(path, dtype=dtype, block_size=16, num_blocks=16,
                                                  max_context=256)
        runner.capture_logits = True
        engine = Engine(runner, max_num_batched_tokens=24)
        prompts = [list(range(10, 10 + n)) for n in (7, 30)]
        for i, p in enumerate(prompts):
            engine.add_request(EngineRequest(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True)))
        while engine.has_work():
            engine.step()
        outs[dtype] = torch.cat(runner.captured_logits["r1"])[:30]  # the prompt: same tokens in both
        assert runner.pool.dtype == getattr(torch, dtype)
    assert torch.isfinite(outs["bfloat16"]).all()
    # bf16 carries ~3 significant digits: close to float32, not equal
    cos = torch.nn.functional.cosine_similarity(outs["bfloat16"], outs["float32"], dim=-1)
    assert cos.min().item() > 0.99
