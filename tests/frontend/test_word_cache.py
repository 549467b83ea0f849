"""Word-by-word encoding with remembered words equals the tokenizer's own encode."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from dyn.engine.gguf.tokenizer import _LLAMA3_SPLIT, _TEKKEN_SPLIT
from dyn.frontend.token_cache import SegmentEncoder
from dyn.frontend.word_cache import word_encoder

ASCII = ["the", "The", " router", "cache's", "it'S", "we'll", "I'M", "don't", "12345", "7", " 2026", "3.14",
         "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "x\ty", ",.;!?", " (a+b)*c", "{'k': [1, 2]}", "_id",
         "abc", "ab", "tail  ", "$5", "a-b", "`x`", "~/", "|", "<=>", "^2", "\\n", "@dyn", "#1", "a_b"]
"""ASCII text that stresses a split: contractions in either case, digit runs, runs of spaces before
a word, tabs and newlines, punctuation and symbols."""
UNICODE = ["décodé", "naïve", "日本語の", "Straße", "ſo", "\u212a", "İstanbul", "ı", "Ελληνικά", "Привет,", "مرحبا",
           "नमस्ते", "e\u0301", "٣٤٥", "x²", "½", "１２３", "“quoted”", "it’s", "IT’S", " — ", "…", "☺", "\u2764\ufe0f", "🙂", "👩\u200d💻",
           "𝑥²", "\x1c", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u3000", "\u200b", "\ue000"]
"""Text of every kind cut word by word too: accented and non-Latin letters, marks (Devanagari,
a combining accent), letters whose case folds differ between the engines (ß, ſ, K, İ, ı), digits and
numbers of other scripts, typographic punctuation, symbols with a variation selector, emoji and
math letters of the second plane (cut through stand-ins) with a joiner, control and Unicode space characters (Python's \\s holds \\x1c-\\x1f, Oniguruma's does not),
zero-width space, private use."""

OTHER = ["\U00020000", "\U000f0001", "<think>", "</s>", "a<think>b"]
"""What the encoder leaves to the tokenizer: a third-plane ideograph and a private use character of
plane 15 (beyond the second plane), an added token that is not special (<think>), and a special
one (</s>, which SegmentEncoder cuts out first)."""

LOOKAHEAD = r"a(?!bc)|ab|\s+(?!\S)|\s+"
"""Cuts "abc" into "ab" + "c", but "ab" alone into "a" + "b": a word whose ids alone are not its ids
in the text (the lookahead reads past the word's end)."""

DEEPSEEK_V3_SPLITS = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                      r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
                      r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]
"""DeepSeek V3's (and R1's) pre-tokenizer splits: punctuation and symbol classes, marks."""

GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""o200k's split (GPT-4o, gpt-oss): letter-case classes, an optional case-insensitive contraction."""

def _split(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


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
    "cased words": _split(r"\p{Lu}\p{Ll}*"),
    "tekken": _split(_TEKKEN_SPLIT),
    "literal ranges": _split(r"[\x00-\x40]+|\s+|[^\s\x00-\x40]+"),
    "second-plane literal": _split("🙂+|\\s+|[^\\s🙂]+"),
    "gpt-4o": _split(GPT4O_SPLIT),
    "scripts, negated classes": _split(r"\p{Han}+|\p{Greek}+|[^\P{L}\p{Han}]+|\P{L}+|\w\d|\W"),
}
"""The pre-tokenizers dyn's GGUF reader builds (GPT-2, SmolLM2, Llama 3, Tekken), DeepSeek V3's,
o200k's (GPT-4o, gpt-oss), and more the encoder must reproduce: a pattern whose lookahead cuts a
word differently at its end, digit runs kept whole, a split that leaves text between its matches,
letter-case classes, scripts, negated classes (also inside a class), Oniguruma's \\w and \\d
(Unicode, unlike Ruby's own) and \\W, literal ranges a stand-in must stay out of, a literal of the
second plane (no stand-ins)."""


def _texts(rng: random.Random, count: int) -> list[str]:
    """One in three of ASCII only, the others with fragments of UNICODE too, half of those with one of OTHER."""
    texts = []
    for i in range(count):
        pool = ASCII + UNICODE if i % 3 else ASCII
        fragments = [rng.choice(pool) + rng.choice(["", " "]) for _ in range(rng.randrange(1, 30))]
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
    assert words.encode("naïve router, 日本語") == tok.encode("naïve router, 日本語").ids
    assert counting.texts == ["naïve", " 日本語"]  # any script: word by word


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen 2's split (2.5's, 3's), behind an NFC normalizer."""

NOT_NFC = ["e\u0301", "\u212b", "\u1100\u1161", "\u0958", "a\u0323\u0302"]
"""Text NFC changes: a letter and its combining accent, the angstrom sign, Hangul jamo, a Devanagari
composition exclusion, two accents out of canonical order."""


@pytest.mark.parametrize("normalizer", [normalizers.NFC(), normalizers.Sequence([normalizers.NFC()])])
def test_an_nfc_tokenizer_gets_nfc_text_cut_word_by_word_and_the_rest_whole(normalizer):
    tok = _trained(_split(QWEN2_SPLIT), normalizer=normalizer)
    counting = _Counting(tok)
    words = word_encoder(counting)
    assert words is not None
    rng = random.Random(5)
    texts = _texts(rng, 400) + [f"{rng.choice(ASCII)} {rng.choice(NOT_NFC)} {rng.choice(UNICODE)}" for _ in range(60)]
    for text in texts:
        if "</s>" not in text:
            assert words.encode(text) == tok.encode(text, add_special_tokens=False).ids, repr(text)
    for text, whole in [("the café router", False), ("the cafe\u0301 router", True), ("the \u0378 router", True)]:
        counting.texts.clear()  # (U+0378: unassigned, its NFC may differ in the tokenizer's Unicode version)
        assert words.encode(text) == tok.encode(text, add_special_tokens=False).ids
        assert (counting.texts == [text]) is whole, counting.texts


@pytest.mark.parametrize("shape, text, whole", [
    ("gpt2", "the 🙂 router", False),  # the second plane: cut through a stand-in
    ("gpt2", "the \U00020000 router", True),  # beyond the second plane
    ("second-plane literal", "the 🙂 router", True),  # a pattern naming 🙂: no stand-ins
    ("gpt2", "the \udc00 router", True),  # a lone surrogate (the tokenizer's own error, as before)
    ("gpt2", "the Straße router", False),  # no case-insensitive group: ß is cut here
    ("llama3", "the Straße router", True),  # (?i:'s|...) and ß case-maps to "ss" (the engines fold such
    ("llama3", "the ſo router", True),  # letters differently: ß matches (?i:ss) in Oniguruma only), ſ to "S"
    ("llama3", "the \u212a router", False),  # the Kelvin sign folds to k, not a letter of the group
])
def test_text_the_engines_could_cut_differently_goes_to_the_tokenizer_whole(shape, text, whole):
    tok = _trained(SHAPES[shape])
    counting = _Counting(tok)
    words = word_encoder(counting)
    words.encode("the router")
    counting.texts.clear()
    if "\udc00" in text:
        with pytest.raises(Exception):
            tok.encode(text)
        with pytest.raises(Exception):
            words.encode(text)
    else:
        assert words.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert (counting.texts == [text]) is whole, counting.texts


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_random_code_points_cut_as_the_tokenizer_cuts_them(shape):
    """Random characters of the first two planes (spaces, digits, punctuation, marks, letters of
    every script, emoji, math letters), against the tokenizer's own ids."""
    tok = _trained(SHAPES[shape])
    words = word_encoder(tok)
    rng = random.Random(4)
    def char() -> str:
        while True:
            code = rng.choice([rng.randrange(0x80), rng.randrange(0x3000), rng.randrange(0x10000),
                               rng.randrange(0x10000), rng.randrange(0x1F000, 0x1FB00)])
            if not 0xD800 <= code < 0xE000:
                return chr(code)
    for _ in range(300):
        text = "".join(char() if rng.random() < 0.5 else rng.choice(ASCII) for _ in range(rng.randrange(1, 40)))
        assert words.encode(text) == tok.encode(text, add_special_tokens=False).ids, repr(text)


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
    ("normalizer", pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFKC()),
    ("normalizers", pre_tokenizers.ByteLevel(add_prefix_space=False),
     normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])),
    ("no split", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), None),
    ("split after bytes", pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                   pre_tokenizers.Split(Regex("Ġ"), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
    ("removed split", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), behavior="removed"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
    *((why, _split(pattern), None) for why, pattern in [
        ("line anchor", r"^ ?\p{L}+|\p{L}+|\s+|[^\s\p{L}]+"),  # ^ is a line start in Oniguruma, a text start in re
        ("word boundary", r"\b\p{L}+|\s+|[^\s\p{L}]+"),
        ("inline flag", r"(?i)ab|\s+"),
        ("class in a folded group", r"(?i:'[a-z]+)|\s+"),
        ("possessive after a count", r"\p{L}{1,3}+|\s+"),
        ("capture group", r"(\p{L})+|\s+"),
    ]),
])
def test_tokenizers_it_cannot_reproduce_get_no_word_encoder_and_stay_exact(why, pre_tokenizer, normalizer):
    tok = _trained(pre_tokenizer, normalizer=normalizer)
    assert word_encoder(tok) is None, why
    segments = SegmentEncoder(tok, verify_calls=0)
    for text in _texts(random.Random(3), 50):
        assert segments.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_plain_added_tokens_matched_unnormalized_are_cut_out_like_special_ones():
    """Qwen 3's <think> and <tool_call> are plain added tokens the tokenizer matches in the raw text:
    the text around them goes word by word. A plain one matched after normalizing (this tokenizer's
    <think>) stays inside its piece, which goes to the tokenizer whole."""
    tok = _trained(SHAPES["llama3"])
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    counting = _Counting(tok)
    segments = SegmentEncoder(counting, verify_calls=0)
    segments.encode("the router cache")
    counting.texts.clear()
    cut = "the router<tool_call>the cache</s> router"
    assert segments.encode(cut) == tok.encode(cut, add_special_tokens=False).ids
    assert counting.texts == []  # every word known: the added tokens were cut out, nothing went whole
    kept = "the router<think>the cache"
    assert segments.encode(kept) == tok.encode(kept, add_special_tokens=False).ids
    assert counting.texts == [kept]
    rng = random.Random(6)
    for text in _texts(rng, 300):
        text = text.replace(" ", "<tool_call>", 1) if rng.random() < 0.5 else text + "<tool_call>"
        assert segments.encode(text) == tok.encode(text, add_special_tokens=False).ids, repr(text)
