"""Hugging Face checkpoints: `config.json` and safetensors (single file or sharded).

`read_model_config` turns config.json into a frozen `ModelConfig` (old
`rope_scaling`/`rope_theta` keys and the newer `rope_parameters` both work);
`open_checkpoint` maps every tensor name to the file that holds it so the model
can load tensor by tensor and name the file in every error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dyn.errors import EngineError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(EngineError):
    """A checkpoint file is missing or wrong; `path` and `tensor` locate it."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 tensor: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        where = f"{self.path}: " if self.path else ""
        what = f"tensor {tensor!r}: " if tensor else ""
        super().__init__(f"{where}{what}{message}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The Llama-family shape of a checkpoint (Llama 2/3, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    """Sorted (key, value) pairs of the rope scaling dict (hashable); None for plain RoPE."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse and validate `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    raw = _read_json(path)
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise CheckpointError("no 'architectures' list; cannot tell which model this is", path=path)
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
                              path=path)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (only 'silu')", path=path)
    if raw.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported", path=path)
    hidden = _int(raw, "hidden_size", path)
    heads = _int(raw, "num_attention_heads", path)
    kv_heads = _int(raw, "num_key_value_heads", path, default=heads)
    head_dim = raw.get("head_dim") or (hidden // heads)
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                              path=path)
    theta, scaling = _rope(raw, path)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        architecture=arch,
        vocab_size=_int(raw, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", path),
        num_layers=_int(raw, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama's flag also puts a bias on o_proj.
        attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        eos_token_ids=eos_ids,
        bos_token_id=raw.get("bos_token_id"),
    )


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, opened lazily per file."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.file_of: dict[str, Path] = _weight_map(self.model_dir)

    def names(self) -> set[str]:
        return set(self.file_of)

    def tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, Path, Any]]:
        """Yield (name, file, tensor) for `names` (all when None), one file open at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, file in self.file_of.items():
            if names is None or name in names:
                by_file.setdefault(file, []).append(name)
        for file, file_names in sorted(by_file.items()):
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read safetensors file: {exc}", path=file) from exc
            with handle as f:
                present = set(f.keys())
                for name in sorted(file_names):
                    if name not in present:
                        raise CheckpointError(f"listed in {INDEX_FILE} but not in the shard", path=file,
                                              tensor=name)
                    yield name, file, f.get_tensor(name)


def _weight_map(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.exists():
        raw = _read_json(index)
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("no 'weight_map' object", path=index)
        out: dict[str, Path] = {}
        for name, shard in weight_map.items():
            file = model_dir / str(shard)
            if not file.is_file():
                raise CheckpointError(f"shard {shard!r} named in the index does not exist", path=index, tensor=name)
            out[name] = file
        return out
    if single.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as exc:  # corrupt header
            raise CheckpointError(f"cannot read safetensors file: {exc}", path=single) from exc
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)",
                          path=model_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("file not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(raw, dict):
        raise CheckpointError("expected a JSON object", path=path)
    return raw


def _int(raw: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{key} must be a positive integer, got {value!r}", path=path)
    return value


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"rope scaling must be an object, got {params!r}", path=path)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"rope_type {kind!r} is not supported (default, llama3)", path=path)
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in params]
    if missing:
        raise CheckpointError(f"llama3 rope scaling lacks {', '.join(missing)}", path=path)
    scaling = {k: params[k] for k in needed}
    scaling["rope_type"] = "llama3"
    return theta, tuple(sorted(scaling.items()))
