"""Piecewise prompt encoding with cached long pieces equals whole-prompt encoding."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from dyn.frontend.token_cache import MIN_CACHED_CHARS, SegmentEncoder

WORDS = "the system router cache prefix token worker décodé naïve 123 ,.;!? \n\n  tabs\tand  spaces".split(" ")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    import torch

    from dyn.engine.tiny import write_tiny_checkpoint
    from dyn.engine.tokenizer import Tokenizer

    torch.set_num_threads(1)
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32)
    return Tokenizer.from_dir(path)


def _chat(tok, rng: random.Random, system: str) -> str:
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 80)))
    return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}])


def test_cached_pieces_give_the_tokenizers_ids_and_hit_on_shared_system_prompts(tiny_tokenizer):
    hf = tiny_tokenizer.hf_tokenizer
    enc = SegmentEncoder(hf, verify_calls=0)  # checked here instead, on every prompt
    assert enc.enabled
    rng = random.Random(7)
    systems = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(4)]
    assert all(len(s) > MIN_CACHED_CHARS for s in systems)
    for _ in range(200):
        text = _chat(tiny_tokenizer, rng, rng.choice(systems))
        assert enc.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert enc.hits >= 200 - 4  # each system prompt tokenized once (long user turns are misses)


class _CountingTokenizer:
    """The Hugging Face tokenizer, counting encode calls."""

    def __init__(self, hf) -> None:
        self.hf, self.calls = hf, 0

    def get_added_tokens_decoder(self):
        return self.hf.get_added_tokens_decoder()

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return self.hf.encode(text, add_special_tokens=add_special_tokens)


def test_role_headers_between_pieces_are_cached_so_a_seen_system_prompt_leaves_one_encode(tiny_tokenizer):
    counting = _CountingTokenizer(tiny_tokenizer.hf_tokenizer)
    enc = SegmentEncoder(counting, verify_calls=0)
    rng = random.Random(11)
    system = " ".join(rng.choice(WORDS) for _ in range(300))
    enc.encode(_chat(tiny_tokenizer, rng, system))  # system prompt and role headers: misses
    for _ in range(20):
        text = _chat(tiny_tokenizer, rng, system)
        before = counting.calls
        assert enc.encode(text) == tiny_tokenizer.hf_tokenizer.encode(text, add_special_tokens=False).ids
        assert counting.calls - before <= 1  # only the new user turn (with its headers when it is short)


def test_a_tokenizer_whose_pieces_interact_falls_back_to_whole_encoding():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁b": 3, "b": 4, "▁": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    enc = SegmentEncoder(tok, verify_calls=4)
    text = "a " * 200 + "<s>" + "b " * 200
    assert enc.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert not enc.enabled  # "first" prepends only at the very start: pieces differ, so the cache is off
    stripping = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    stripping.add_special_tokens([AddedToken("<s>", special=True, lstrip=True)])
    assert not SegmentEncoder(stripping).enabled  # a special token that eats spaces: never split there


def test_with_special_tokens_the_ids_are_the_tokenizers_bos_and_eos_included(tiny_tokenizer):
    from tokenizers import processors

    from dyn.frontend.text import ModelTokenizer

    hf = tiny_tokenizer.hf_tokenizer
    model_tok = ModelTokenizer(tiny_tokenizer)  # the completions path: BOS before the text
    both = Tokenizer.from_str(hf.to_str())
    both.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>",
        special_tokens=[(t, hf.token_to_id(t)) for t in ("<|begin_of_text|>", "<|end_of_text|>")])
    enc = SegmentEncoder(both, verify_calls=0)
    rng = random.Random(5)
    for _ in range(100):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 200)))
        for add in (True, False):
            assert model_tok.encode(text, add) == hf.encode(text, add_special_tokens=add).ids
            assert enc.encode(text, add) == both.encode(text, add_special_tokens=add).ids
    assert enc.encode("the", True)[0] == hf.token_to_id("<|begin_of_text|>")
    assert enc.encode("the", True)[-1] == hf.token_to_id("<|end_of_text|>")


def test_threads_encoding_the_same_new_pieces_keep_the_cache_consistent(tiny_tokenizer):
    """Long prompts encode on threads beside the event loop: two of them meeting the same new system
    prompt both miss it; the cache keeps it once and its size stays what it holds."""
    from concurrent.futures import ThreadPoolExecutor

    hf = tiny_tokenizer.hf_tokenizer
    enc = SegmentEncoder(hf, max_entries=6, verify_calls=0)
    rng = random.Random(13)
    systems = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(9)]
    texts = [_chat(tiny_tokenizer, rng, systems[i % 9]) for i in range(360)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(enc.encode, texts))
    assert got == [hf.encode(text, add_special_tokens=False).ids for text in texts]
    assert enc._chars == sum(map(len, enc._cache)) and len(enc._cache) <= 6
