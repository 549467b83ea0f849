"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` byte-level BPE.

GGUF stores the vocabulary, merges, token types (3 = control, 4 = user
defined), special token ids and the chat template as metadata. The split
regex is not stored, only a name (`tokenizer.ggml.pre`); `_pre_tokenizer`
maps the names dyn knows (`_DIGITS_FIRST`, `_SPLITS`, `_GPT2`) to what
llama.cpp's tokenizer does for them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dyn.engine.gguf.reader import GGUFFile
from dyn.engine.loader import CheckpointError

CONTROL = 3
USER_DEFINED = 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's split with digits one by one: Qwen 2, 2.5 and 3, and DeepSeek-R1's Qwen distills.
(Their tokenizer.json adds an NFC normalizer; llama.cpp, and transformers reading a GGUF, do not.)"""
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Mistral's Tekken (Nemo, Small 3): a capitalised word is one piece, digits one by one; as its
tokenizer.json and transformers' GGUF reader split (llama.cpp approximates the letter cases by ASCII)."""

_DIGITS_FIRST = ("smollm", "starcoder", "refact")
"""Each digit its own piece, then GPT-2's regex."""
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT}
"""Names whose split regex comes before a ByteLevel without its own."""
_GPT2 = ("default", "gpt2", "gpt-2")
"""ByteLevel with GPT-2's regex alone."""


class GGUFTokenizer(NamedTuple):
    tokenizer: Any
    """tokenizers.Tokenizer"""
    config: dict[str, Any]
    """tokenizer_config.json content (special tokens, chat template, add_bos_token)."""


def build_tokenizer(gguf: GGUFFile) -> GGUFTokenizer:
    """The tokenizer and tokenizer_config of `gguf`; CheckpointError for non-BPE vocabularies."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = gguf.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')",
                              path=gguf.path)
    tokens: list[str] = gguf.require("tokenizer.ggml.tokens")
    merges: list[str] = gguf.require("tokenizer.ggml.merges")
    types: list[int] = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(gguf.get("tokenizer.ggml.pre", "default"), gguf)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        idx = gguf.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf.get("tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf.arch("context_length", 4096)),
    }
    template = gguf.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    if config["add_bos_token"] and config["bos_token"]:
        from tokenizers import processors

        bos = config["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return GGUFTokenizer(tok, config)


def _pre_tokenizer(pre: str, gguf: GGUFFile) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_FIRST:
        # llama.cpp: each digit its own piece, then GPT-2's regex (SmolLM2's own tokenizer.json does the same)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _GPT2:
        return byte_level
    known = ", ".join([*_DIGITS_FIRST, *_SPLITS, *_GPT2])
    raise CheckpointError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported ({known})", path=gguf.path)
