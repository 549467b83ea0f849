"""The torch engine on CUDA: the same logits and greedy tokens as transformers (GPU only).

Runs where a GPU is lent (scripts/device_check.sh runs `-m gpu`); skips with the reason on CPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 320
STEPS = 16
ATOL = 1e-3
"""float32 on the GPU (torch keeps TF32 matmuls off by default): close to the CPU reference."""


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_cuda_engine_matches_transformers(variant, hf_checkpoint, hf_model):
    path = hf_checkpoint(variant)
    runner = TorchModelRunner.from_pretrained(path, dtype="float32", device="cuda", block_size=8,
                                              num_blocks=128, max_context=256)
    runner.capture_logits = True
    engine = Engine(runner, max_batch_size=8, max_num_batched_tokens=32)
    assert engine.kv_on_cuda  # the KV hand-off may offer cuda_ipc for its blocks
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 19, 40)]
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=STEPS, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    hf = hf_model(path)
    for i, prompt in enumerate(prompts):
        generated = tokens[f"r{i}"]
        ours = torch.cat([t.float().cpu() for t in runner.captured_logits[f"r{i}"]])
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + generated[:-1]])).logits[0].float()[-ours.shape[0]:]
        assert (ours - ref).abs().max().item() < ATOL
        assert ref[-len(generated):].argmax(-1).tolist() == generated
