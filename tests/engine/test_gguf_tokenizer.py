"""The tokenizer rebuilt from GGUF metadata equals transformers' tokenizer for the same file."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from dyn.engine.gguf.reader import GGUFFile  # noqa: E402
from dyn.engine.gguf.tokenizer import build_tokenizer  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "What is the capital of France?",
    "  two leading spaces, two trailing  ",
    "tabs\tand\nnewlines\r\n\n\nand blank lines",
    "digits 1234567890, 3.14159 and 1e-9; 2024-12-01",
    "naïve café, Größe, 日本語のテキスト, emoji 🙂👍🏽, ZWJ 👩‍👩‍👧",
    "It's, don't, we'll, I'd, THEY'RE",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return {'a': [1, 2]}  # code",
    "",
]
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  spaced \n out  "}],
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(text, ours, reference):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_equal_transformers(messages, ours, reference):
    rendered = ours.apply_chat_template(messages)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.encode(rendered, add_special_tokens=False) == reference.encode(rendered, add_special_tokens=False)


def test_special_tokens_and_eos(ours, reference, smollm2_gguf):
    assert ours.eos_token_ids == (reference.eos_token_id,) == (ours.token_to_id("<|im_end|>"),)
    assert ours.bos_token == reference.bos_token == "<|im_start|>"
    assert ours.vocab_size == len(reference) == 49152
    built = build_tokenizer(GGUFFile(smollm2_gguf))
    assert built.config["add_bos_token"] is False
    assert set(built.config["additional_special_tokens"]) == \
        {t.content for t in reference.added_tokens_decoder.values() if t.special}


def test_directory_loads_in_transformers_autotokenizer(smollm2_dir, reference):
    import transformers

    auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        assert auto.encode(text) == reference.encode(text)
    assert auto.apply_chat_template(MESSAGES[1], tokenize=False) == \
        reference.apply_chat_template(MESSAGES[1], tokenize=False)
