"""Qwen 2 and Qwen 3 GGUF files (Qwen2.5, Qwen3, DeepSeek-R1's Qwen distills): dyn reads them back
into the Hugging Face checkpoint they were written from, as transformers does.

The files are written here with gguf's own writer the way llama.cpp's converter writes these
architectures: llama.cpp's names, q and k rows as HF has them (no pair interleaving: Qwen runs
NEOX-style RoPE there), the head size as attention.key_length, a byte-level BPE vocabulary with
pre-tokenizer "qwen2". The checkpoints are tests/engine/conftest.py's random ones (random norms and
biases too), so a wrong name, permutation or head size cannot pass. The vocabulary is read as
transformers' GGUF reader reads it under each pre-tokenizer name dyn knows beside Qwen's (Tekken,
Falcon 3, Llama 3).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from dyn.engine.gguf.convert import convert_gguf  # noqa: E402
from dyn.engine.gguf.tokenizer import _QWEN2_SPLIT  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402

LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
"""HF name (or its part after model.layers.N.) -> llama.cpp's, as its converter maps them."""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["What is the capital of France?", "It's, don't, WE'LL; 12345 and 3.14", "naïve café, 日本語", "CamelCase McDonald's ÉCOLE über/path",
         "  spaces\tand\nnewlines\r\n", "<|im_start|>user\nhi<|im_end|>\n", ""]


def _vocabulary(size: int) -> tuple[list[str], list[str]]:
    """`size` tokens (bytes, merges learned with Qwen 2's split, the special tokens last) and merges."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rng = random.Random(0)
    words = "the capital of France is Paris and it's a city where we'll see 2024 cafés".split()
    words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 7))) for _ in range(200)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert len(tokens) == size - len(SPECIALS)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + SPECIALS, merges


def _write_gguf(hf_dir: Path, arch: str, path: Path, *, pre: str = "qwen2", weights: bool = True) -> Path:
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    rope_theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tokens, merges = _vocabulary(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, values in load_file(str(hf_dir / "model.safetensors")).items() if weights else ():
        parts = name.split(".")
        gguf_name = (f"blk.{parts[2]}.{LLAMA_CPP_NAMES['.'.join(parts[3:])]}" if parts[1] == "layers"
                     else LLAMA_CPP_NAMES[name])
        writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def qwen_gguf(hf_checkpoint, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = _write_gguf(hf_checkpoint(arch), arch, tmp_path_factory.mktemp(arch) / f"{arch}.gguf")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_weights_and_shape_come_back_as_the_checkpoint_they_were_written_from(arch, qwen_gguf, hf_checkpoint,
                                                                               tmp_path):
    from safetensors.torch import load_file

    out = convert_gguf(qwen_gguf(arch), tmp_path / "converted")
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(hf_checkpoint(arch) / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    config, original = (json.loads((d / "config.json").read_text()) for d in (out, hf_checkpoint(arch)))
    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    assert {k: config[k] for k in keys} == {k: original[k] for k in keys}
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"], rel=1e-6)  # (a float32 in GGUF)
    assert config["rope_theta"] == (original.get("rope_theta") or original["rope_parameters"]["rope_theta"])
    # Qwen 3's head here is 32 wide over a 64-wide model of 4 heads: only key_length says so
    assert config["head_dim"] == original.get("head_dim", original["hidden_size"] // original["num_attention_heads"])


def test_transformers_reads_the_file_as_the_same_checkpoint(qwen_gguf, hf_checkpoint):
    """The file follows llama.cpp's conventions as transformers' GGUF loader reads them (Qwen 2: its
    loader takes no head size from a file, so Qwen 3's 32-wide heads are left out of this check)."""
    import transformers

    path = qwen_gguf("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    from safetensors.torch import load_file

    theirs = load_file(str(hf_checkpoint("qwen2") / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in theirs.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("pre", ["qwen2", "deepseek-r1-qwen", "tekken", "falcon3", "llama-bpe"])
def test_tokenizer_and_chat_template_equal_transformers_reading_of_the_file(pre, hf_checkpoint, tmp_path):
    import transformers
    from dyn.engine.gguf.reader import GGUFFile
    from dyn.engine.gguf.tokenizer import build_tokenizer

    path = _write_gguf(hf_checkpoint("qwen2"), "qwen2", tmp_path / "t.gguf", pre=pre, weights=False)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    built = build_tokenizer(GGUFFile(path))
    ours = Tokenizer(built.tokenizer, chat_template=built.config["chat_template"], bos_token=None,
                     eos_token="<|im_end|>")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        # (the same pieces too: a small vocabulary's ids could hide a different split)
        assert built.tokenizer.pre_tokenizer.pre_tokenize_str(text) == \
            reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text), text
    pieces = [piece for piece, _ in built.tokenizer.pre_tokenizer.pre_tokenize_str("1234")]
    assert pieces == (["123", "4"] if pre in ("llama-bpe", "falcon3") else ["1", "2", "3", "4"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token_ids == (ours.token_to_id("<|im_end|>"),)
