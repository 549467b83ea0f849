"""Bad checkpoints fail with a CheckpointError (an EngineError) naming the file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from dyn.engine.loader import CheckpointError, read_model_config  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402
from dyn.errors import EngineError  # noqa: E402


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load(path: Path, **kw) -> TorchModelRunner:
    return TorchModelRunner.from_pretrained(path, dtype="float32", block_size=8,
                                            num_blocks=kw.pop("num_blocks", 4), max_context=64, **kw)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_config_and_architecture(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    _edit_config(path, architectures=["MixtralForCausalLM"])
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert isinstance(err.value, EngineError)
    assert err.value.path == str(path / "config.json")
    assert "MixtralForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_missing_weight_names_tensor(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert err.value.tensor == "model.layers.1.mlp.up_proj.weight"
    assert "missing" in str(err.value) and "model.safetensors" in str(err.value)


def test_shape_mismatch_names_tensor_file_and_shapes(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert err.value.tensor == "model.layers.0.self_attn.k_proj.weight"
    assert err.value.path == str(path / "model.safetensors")
    assert "[16, 64]" in str(err.value) and "[32, 64]" in str(err.value)


def test_config_that_disagrees_with_weights_is_a_shape_error(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    _edit_config(path, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"mlp\.(down|gate|up)_proj\.weight.*shape"):
        _load(path)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert err.value.tensor == "model.layers.0.self_attn.q_norm.weight"


def test_sharded_index_pointing_at_a_missing_shard(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama-sharded"), tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert err.value.path == str(path / "model.safetensors.index.json")
    assert shard.name in str(err.value)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 0}))
    with pytest.raises(CheckpointError, match="hidden_size must be a positive integer"):
        read_model_config(tmp_path)


def test_no_weights_file(hf_checkpoint, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(hf_checkpoint("llama") / "config.json", path)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        _load(path)


def test_pool_budget_and_device_errors(hf_checkpoint):
    path = hf_checkpoint("llama")
    with pytest.raises(EngineError, match="holds no KV block"):
        _load(path, num_blocks=None, kv_memory_bytes=100)
    with pytest.raises(EngineError, match="give num_blocks or kv_memory_bytes"):
        _load(path, num_blocks=None)
    with pytest.raises(EngineError, match="dtype 'int8' is not supported"):
        TorchModelRunner.from_pretrained(path, dtype="int8", num_blocks=4)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            TorchModelRunner.from_pretrained(path, device="cuda", num_blocks=4)
    runner = _load(path, num_blocks=None, kv_memory_bytes=10 * 4096 + 5)
    assert runner.block_bytes == 4096 and runner.num_blocks == 10


def _old_style_config(path: Path, rope_scaling: dict) -> None:
    """Rewrite config.json the way transformers 4.x saved it (rope_theta + rope_scaling)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling=rope_scaling)
    (path / "config.json").write_text(json.dumps(cfg))


def test_transformers4_llama3_rope_config_is_read(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    _old_style_config(path, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config = read_model_config(path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_unsupported_or_incomplete_rope_scaling(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    _old_style_config(path, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="rope_type 'yarn' is not supported"):
        _load(path)
    _old_style_config(path, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(CheckpointError, match="llama3 rope scaling lacks low_freq_factor"):
        _load(path)
