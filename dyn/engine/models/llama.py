"""The Llama-family decoder (Llama 2/3, Qwen2, Qwen3) over a flat batch of tokens.

One class covers the family: Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm
on q and k, Llama 3 a scaled RoPE. Weights are plain tensors (no nn.Module, no
autograd); q/k/v and gate/up are fused into one matmul each, which matters on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dyn.engine.layers.attention import AttentionMetadata, paged_attention
from dyn.engine.layers.norm import rms_norm
from dyn.engine.layers.rotary import RotaryEmbedding, apply_rotary
from dyn.engine.loader import Checkpoint, CheckpointError, ModelConfig
from dyn.engine.weight_arena import WeightArena

# Present in some checkpoints, never used: buffers the reference recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    """Weights plus a forward pass over flattened tokens of many sequences."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 max_positions: int) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        self.rope = RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling_dict,
                                    dtype=dtype, device=device)

        # Shapes first (meta tensors), then every weight becomes a view into one flat byte arena
        # (dyn.engine.weight_arena), so a peer can stream the whole model as fixed-size blocks into place.
        def new(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device="meta")

        self.embed = new(c.vocab_size, c.hidden_size)
        self.norm = new(c.hidden_size)
        self.lm_head = self.embed if c.tie_word_embeddings else new(c.vocab_size, c.hidden_size)
        o_bias = c.attention_bias and c.architecture == "LlamaForCausalLM"
        qkv_rows = self.q_size + 2 * self.kv_size
        self.layers = [
            _Layer(new(c.hidden_size), new(qkv_rows, c.hidden_size),
                   new(qkv_rows) if c.attention_bias else None,
                   new(c.hidden_size, self.q_size), new(c.hidden_size) if o_bias else None,
                   new(c.head_dim) if c.qk_norm else None, new(c.head_dim) if c.qk_norm else None,
                   new(c.hidden_size), new(2 * c.intermediate_size, c.hidden_size),
                   new(c.hidden_size, c.intermediate_size))
            for _ in range(c.num_layers)
        ]
        self.arena = WeightArena.allocate(_named_shapes(self), dtype=dtype, device=device)
        self._bind_arena()
        self._targets = self._weight_targets()

    def load(self, checkpoint: Checkpoint, names: set[str] | None = None) -> None:
        """Copy every checkpoint tensor (or only `names`) into place; raise CheckpointError naming any
        bad or missing one."""
        present = checkpoint.names()
        unknown = sorted(n for n in present if n not in self._targets and not self._is_ignorable(n))
        if unknown:
            raise CheckpointError(f"unexpected tensor for {self.config.architecture} "
                                  f"({len(unknown)} unexpected in all; does config.json match the weights?)",
                                  path=checkpoint.file_of[unknown[0]], tensor=unknown[0])
        missing = sorted(n for n in self._targets if n not in present)
        if missing:
            where = sorted({p.name for p in checkpoint.file_of.values()})
            raise CheckpointError(f"missing from the checkpoint (looked in {', '.join(where)}; "
                                  f"{len(missing)} missing in all)", path=checkpoint.model_dir, tensor=missing[0])
        with torch.inference_mode():
            wanted = set(self._targets) if names is None else set(self._targets) & set(names)
            for name, file, tensor in checkpoint.tensors(wanted):
                dest = self._targets[name]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(f"shape {list(tensor.shape)} does not match config.json, which "
                                          f"implies {list(dest.shape)}", path=file, tensor=name)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"dtype {tensor.dtype} is not a float type", path=file, tensor=name)
                dest.copy_(tensor)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                pool_rows: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] for flat `input_ids`; writes K/V into the pool."""
        c = self.config
        t = input_ids.shape[0]
        h = self.embed[input_ids]
        cos, sin = self.rope.tables(positions)
        for idx, w in enumerate(self.layers):
            x = rms_norm(h, w.input_norm, c.rms_norm_eps)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(t, c.num_heads, c.head_dim)
            k = k.reshape(t, c.num_kv_heads, c.head_dim)
            v = v.reshape(t, c.num_kv_heads, c.head_dim)
            if w.q_norm is not None:
                q = rms_norm(q, w.q_norm, c.rms_norm_eps)
                k = rms_norm(k, w.k_norm, c.rms_norm_eps)  # type: ignore[arg-type]
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            attn = paged_attention(q, k, v, idx, pool_rows, meta, self.scale)
            h = h + F.linear(attn.reshape(t, self.q_size), w.o, w.o_bias)
            x = rms_norm(h, w.post_norm, c.rms_norm_eps)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w.down)
        return rms_norm(h, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, vocab]."""
        return F.linear(hidden, self.lm_head).float()

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        for tensor in self._targets.values():
            base = tensor._base if tensor._base is not None else tensor
            if id(base) not in seen:
                seen.add(id(base))
                total += base.numel()
        return total

    def checkpoint_ranges(self) -> dict[str, tuple[int, int]]:
        """Checkpoint tensor name -> (offset, nbytes) of where it lands in the arena."""
        base = self.arena.data.data_ptr()
        return {name: (t.data_ptr() - base, t.numel() * t.element_size()) for name, t in self._targets.items()}

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every distinct weight tensor in arena order, by a stable name (fused q/k/v, gate/up)."""
        return [(name, getattr_path(self, name)) for name, _ in _named_shapes(self)]

    def _bind_arena(self) -> None:
        for name, view in self.arena.views().items():
            setattr_path(self, name, view)
        if self.config.tie_word_embeddings:
            self.lm_head = self.embed

    def _is_ignorable(self, name: str) -> bool:
        return name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings)

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the (slice of the) tensor it loads into."""
        c = self.config
        q, kv, inter = self.q_size, self.kv_size, c.intermediate_size
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        for i, w in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = w.input_norm
            out[p + "post_attention_layernorm.weight"] = w.post_norm
            for name, lo, hi in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
                out[p + f"self_attn.{name}_proj.weight"] = w.qkv[lo:hi]
                if w.qkv_bias is not None:
                    out[p + f"self_attn.{name}_proj.bias"] = w.qkv_bias[lo:hi]
            out[p + "self_attn.o_proj.weight"] = w.o
            if w.o_bias is not None:
                out[p + "self_attn.o_proj.bias"] = w.o_bias
            if w.q_norm is not None and w.k_norm is not None:
                out[p + "self_attn.q_norm.weight"] = w.q_norm
                out[p + "self_attn.k_norm.weight"] = w.k_norm
            out[p + "mlp.gate_proj.weight"] = w.gate_up[:inter]
            out[p + "mlp.up_proj.weight"] = w.gate_up[inter:]
            out[p + "mlp.down_proj.weight"] = w.down
        return out


_LAYER_FIELDS = ("input_norm", "qkv", "qkv_bias", "o", "o_bias", "q_norm", "k_norm", "post_norm", "gate_up", "down")


def _named_shapes(model: LlamaModel) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight the model owns; tied lm_head is the embedding, not a copy."""
    out = [("embed", tuple(model.embed.shape)), ("norm", tuple(model.norm.shape))]
    if not model.config.tie_word_embeddings:
        out.append(("lm_head", tuple(model.lm_head.shape)))
    for i, layer in enumerate(model.layers):
        for field_name in _LAYER_FIELDS:
            tensor = getattr(layer, field_name)
            if tensor is not None:
                out.append((f"layers.{i}.{field_name}", tuple(tensor.shape)))
    return out


def getattr_path(model: LlamaModel, name: str) -> torch.Tensor:
    if name.startswith("layers."):
        _, idx, field_name = name.split(".")
        return getattr(model.layers[int(idx)], field_name)
    return getattr(model, name)


def setattr_path(model: LlamaModel, name: str, value: torch.Tensor) -> None:
    if name.startswith("layers."):
        _, idx, field_name = name.split(".")
        setattr(model.layers[int(idx)], field_name, value)
    else:
        setattr(model, name, value)
