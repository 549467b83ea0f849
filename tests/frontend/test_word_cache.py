"""Word-by-word encoding with remembered words equals the tokenizer's own encode."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from dyn.engine.gguf.tokenizer import _LLAMA3_SPLIT
from dyn.frontend.token_cache import SegmentEncoder
from dyn.frontend.word_cache import word_encoder

ASCII = ["the", "The", " router", "cache's", "it'S", "we'll", "I'M", "don't", "12345", "7", " 2026", "3.14",
         "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "x\ty", ",.;!?", " (a+b)*c", "{'k': [1, 2]}", "_id",
         "abc", "ab", "tail  ", "$5", "a-b", "`x`", "~/", "|", "<=>", "^2", "\\n", "@dyn", "#1", "a_b"]
OTHER = ["décodé", "naïve", "日本語", "\x1c", "\x0b", "\x0c", "\u00a0", "🙂", "<think>", "</s>", "a<think>b"]
"""Text that stresses a split: contractions in either case, digit runs, runs of spaces before a
word, tabs and newlines, punctuation and symbols; then what the encoder leaves to the tokenizer: non-ASCII
letters, control and Unicode space characters, an added token that is not special (<think>),
and a special one (</s>, which SegmentEncoder cuts out first)."""

LOOKAHEAD = r"a(?!bc)|ab|\s+(?!\S)|\s+"
"""Cuts "abc" into "ab" + "c", but "ab" alone into "a" + "b": a word whose ids alone are not its ids
in the text (the lookahead reads past the word's end)."""

DEEPSEEK_V3_SPLITS = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                      r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
                      r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]
"""DeepSeek V3's (and R1's) pre-tokenizer splits: punctuation and symbol classes, marks."""

SHAPES = {
    "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm2": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "lookahead": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LOOKAHEAD), behavior="isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "grouped digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "deepseek-v3": pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in DEEPSEEK_V3_SPLITS),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "cased words": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Lu}\p{Ll}*"), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
"""The pre-tokenizers dyn's GGUF reader builds (GPT-2, SmolLM2, Llama 3), DeepSeek V3's, and more
the encoder must reproduce: a pattern whose lookahead cuts a word differently at its end, digit
runs kept whole, a split that leaves text between its matches."""


def _texts(rng: random.Random, count: int) -> list[str]:
    """Two in three of ASCII only (cut word by word), the others with a fragment of OTHER."""
    texts = []
    for i in range(count):
        fragments = [rng.choice(ASCII) + rng.choice(["", " "]) for _ in range(rng.randrange(1, 30))]
        if i % 3 == 2:
            fragments.insert(rng.randrange(len(fragments) + 1), rng.choice(OTHER))
        texts.append("".join(fragments))
    return texts


def _trained(pre_tokenizer, *, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(random.Random(1), 300), trainer=trainer)
    tok.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<think>", special=False)])
    return tok


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_word_by_word_ids_equal_the_tokenizers_on_tricky_text(shape):
    tok = _trained(SHAPES[shape])
    words = word_encoder(tok)
    assert words is not None
    segments = SegmentEncoder(tok, verify_calls=0)  # special tokens cut out first, then word by word
    for text in _texts(random.Random(2), 600):
        expected = tok.encode(text, add_special_tokens=False).ids
        assert segments.encode(text) == expected, repr(text)
        if "</s>" not in text:
            assert words.encode(text) == expected, repr(text)
    assert segments.enabled  # no verification turned it off: it was right throughout


class _Counting:
    """A tokenizer that counts the texts it is asked to encode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.texts = tok, []
        self.model, self.pre_tokenizer, self.normalizer = tok.model, tok.pre_tokenizer, tok.normalizer

    def get_added_tokens_decoder(self):
        return self.tok.get_added_tokens_decoder()

    def encode_batch_fast(self, texts, add_special_tokens=True):
        self.texts += texts
        return self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


def test_known_words_need_no_tokenizer_call_and_new_ones_one_batch():
    tok = _trained(SHAPES["gpt2"])
    counting = _Counting(tok)
    words = word_encoder(counting)
    words.encode("the router cache and the cache")
    assert sorted(counting.texts) == sorted(["the", " router", " cache", " and", " the"])
    counting.texts.clear()
    assert words.encode("the cache and the router") == tok.encode("the cache and the router").ids
    assert counting.texts == []
    assert words.encode("the new cache, newer") == tok.encode("the new cache, newer").ids
    assert counting.texts == [" new", ",", " newer"]  # one batch of the new words
    counting.texts.clear()
    words.encode("naïve router")  # not ASCII: the tokenizer's whole encode
    assert counting.texts == ["naïve router"]


def test_a_word_the_pattern_cuts_differently_alone_sends_its_text_to_the_tokenizer():
    tok = _trained(SHAPES["lookahead"])
    assert tok.encode("ab").tokens == ["a", "b"] and tok.encode("abc").tokens == ["ab", "c"]
    counting = _Counting(tok)
    words = word_encoder(counting)
    assert words.encode("x abc") == tok.encode("x abc").ids
    assert counting.texts == ["x abc"]  # "ab" alone is "a" + "b": nothing remembered, the text encoded whole


@pytest.mark.parametrize("why, pre_tokenizer, normalizer", [
    ("metaspace", pre_tokenizers.Metaspace(), None),
    ("prefix space", pre_tokenizers.ByteLevel(add_prefix_space=True), None),
    ("normalizer", pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFC()),
    ("negated class", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\P{L}+"), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), None),
    ("script", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}+|\s+"), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), None),
    ("no split", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), None),
    ("split after bytes", pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                   pre_tokenizers.Split(Regex("Ġ"), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
    ("removed split", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), behavior="removed"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
])
def test_tokenizers_it_cannot_reproduce_get_no_word_encoder_and_stay_exact(why, pre_tokenizer, normalizer):
    tok = _trained(pre_tokenizer, normalizer=normalizer)
    assert word_encoder(tok) is None, why
    segments = SegmentEncoder(tok, verify_calls=0)
    for text in _texts(random.Random(3), 50):
        assert segments.encode(text) == tok.encode(text, add_special_tokens=False).ids
