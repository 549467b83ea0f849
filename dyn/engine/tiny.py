"""A deterministic random-weight Llama checkpoint in Hugging Face format.

Random weights make gibberish, but every mechanism is real: the tokenizer is a
byte-level BPE (all 256 bytes, so any text encodes) trained on a fixed corpus,
the chat template is Llama-3 style, and transformers' LlamaForCausalLM loads
the directory. The same arguments always give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>", "<|reserved_0|>", "<|reserved_1|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is not string %}{{ raise_exception('content must be a string') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A rack of servers turns into one inference service.
Prefill workers read the prompt; decode workers write the answer one token at a time.
The planner keeps latency inside its targets, and the router sends each request where its prefix lives.
user assistant system: Hello! How are you today? I am fine, thank you. What is the weather like?
def main(): return 0  # code, numbers 0123456789, and punctuation: ()[]{}<>!?.,;:'"-_=+*/\\|@#$%^&~`
Bonjour, ça va? Größe, naïve café, 日本語のテキスト, emoji 🙂 and more text for the byte-level merges.
"""


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, *, num_layers: int = 2, hidden_size: int = 64,
                          num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 192,
                          vocab_size: int = 512, max_position_embeddings: int = 4096,
                          tie_word_embeddings: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer files into `directory`; return it."""
    import torch
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).contiguous()

    tensors = {"model.embed_tokens.weight": randn(vocab_size, hidden_size),
               "model.norm.weight": torch.ones(hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(hidden_size),
            p + "self_attn.q_proj.weight": randn(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": randn(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": randn(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": randn(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": randn(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": randn(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": randn(hidden_size, intermediate_size),
        })
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = randn(vocab_size, hidden_size)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": tie_word_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": eos, "pad_token_id": ids["<|pad|>"], "dyn_tiny_seed": seed,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos})
    _write_json(out / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    })
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    return out


def _build_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    num_merges_room = vocab_size - len(SPECIAL_TOKENS)
    if num_merges_room < 256:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_merges_room, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # fill the vocab exactly, so every id the model can emit is a real token
    filler = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{i + 2}|>" for i in range(filler)])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
