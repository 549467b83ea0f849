"""Encode text word by word, each word's ids remembered: byte-level BPE without the Rust call.

A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen 2, DeepSeek V3, SmolLM2) cuts text into
pre-tokens with a regex and merges bytes inside each pre-token only, so a
word's ids never depend on its neighbours. Hugging Face's encode spends most
of its time outside the merges: for a 40-word user turn, 62-99 us, of which
pre-tokenizing alone is ~60 us; its own word cache saves only the merges.
This encoder cuts the text with the tokenizer's own split pattern in Python's
`re` and looks each word up in a dict (~16 us for that turn); a miss costs one
batched encode of the new words.

Exactness rules, each a fall-back to the tokenizer's own encode:
* only the pre-tokenizer shapes dyn ships and meets (ByteLevel with its GPT-2
  regex; Digits then ByteLevel; Split regexes then ByteLevel without its own),
  a BPE model without dropout and no normalizer;
* only text of printable ASCII, tab, newline and carriage return is cut here.
  On those characters each \\p{..} general category of a pattern is a fixed
  set (\\p{L} is A-Z and a-z, \\p{P} !"#%&'()*,-./:;?@[\\]_{}, \\p{M} none),
  so `re` reads the pattern so translated as the tokenizer's engine does;
  other text, and patterns with negated classes or scripts, go to the
  tokenizer whole;
* text holding an added token that is not special goes to the tokenizer whole
  (it cuts those out before pre-tokenizing);
* text with a word that the pattern would cut differently on its own goes to
  the tokenizer whole (that word's ids alone might not be its ids in the text).
SegmentEncoder also compares its first prompts with the tokenizer's own ids.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import chain
from typing import Any, Callable

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""ByteLevel's own split when use_regex is true (the tokenizers library's GPT-2 pattern)."""

MAX_WORDS = 1 << 16
"""Words remembered; the dict is emptied when full (common words come back on the next prompts)."""

_UNSAFE = re.compile(r"[^\x20-\x7e\t\n\r]")
"""What this encoder leaves to the tokenizer: anything but SAFE_CHARS (printable ASCII, tab, newline, CR)."""


BatchEncode = Callable[[list[str], bool], list[list[int]]]
"""texts, add_special_tokens -> each text's ids."""


def batch_encoder(hf_tokenizer: Any) -> BatchEncode:
    """The tokenizer's cheapest encode of several texts: `encode_batch_fast` (tokenizers >= 0.20:
    the ids without the char offsets `encode` computes, ~20% of an encode call; serial where
    TOKENIZERS_PARALLELISM is false, as the frontend sets it), else one `encode` per text."""
    fast = getattr(hf_tokenizer, "encode_batch_fast", None)
    if fast is not None:
        return lambda texts, add_special_tokens: [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]
    return lambda texts, add_special_tokens: [hf_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
                                              for text in texts]


class WordEncoder:
    """`encode(text)` == the tokenizer's encode(text, add_special_tokens=False).ids, for text
    without special tokens (SegmentEncoder cuts those out first)."""

    def __init__(self, hf_tokenizer: Any, stages: list[re.Pattern], added: re.Pattern | None) -> None:
        self._stages = stages
        self._added = added
        self._words: dict[str, list[int]] = {}
        self._encode_batch = batch_encoder(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        known = self._words
        whole = known.get(text)  # a short piece (a role name) is often one known word
        if whole is not None:
            return list(whole)
        if _UNSAFE.search(text) or (self._added is not None and self._added.search(text)):
            return self._encode_batch([text], False)[0]
        words = self._split(text)
        ids = list(map(known.get, words))
        if None in ids and not self._learn(words, ids):
            return self._encode_batch([text], False)[0]
        return list(chain.from_iterable(ids))

    def _split(self, text: str) -> list[str]:
        first, *later = self._stages
        pieces = _isolated(first, text)
        for pattern in later:
            words: list[str] = []
            for piece in pieces:
                words += _isolated(pattern, piece)
            pieces = words
        return pieces

    def _learn(self, words: list[str], ids: list[list[int] | None]) -> bool:
        """Fill in the ids of the words not known yet and remember them; False (nothing
        remembered) when one of them would be cut differently on its own, so its ids alone
        need not be its ids in the text."""
        missing = [i for i, found in enumerate(ids) if found is None]
        new = list(dict.fromkeys(words[i] for i in missing))
        if any(self._split(word) != [word] for word in new):
            return False
        encoded = dict(zip(new, self._encode_batch(new, False), strict=True))
        for i in missing:
            ids[i] = encoded[words[i]]
        known = self._words
        if len(known) + len(new) > MAX_WORDS:
            known.clear()
        known.update(encoded)
        return True


def _isolated(pattern: re.Pattern, text: str) -> list[str]:
    """`text` cut as a tokenizers Split with behavior "isolated": every match a piece, and every
    stretch between matches a piece too."""
    words = pattern.findall(text)
    if sum(map(len, words)) == len(text):
        return words
    out: list[str] = []
    pos = 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if start > pos:
            out.append(text[pos:start])
        if end > start:
            out.append(text[start:end])
        pos = end
    if pos < len(text):
        out.append(text[pos:])
    return out


def word_encoder(hf_tokenizer: Any) -> WordEncoder | None:
    """A WordEncoder for `hf_tokenizer` (a tokenizers.Tokenizer), or None when its normalizer,
    model or pre-tokenizer is not one this encoder reproduces exactly."""
    try:
        model = hf_tokenizer.model
        pre = json.loads(hf_tokenizer.pre_tokenizer.__getstate__())
        normalizer = hf_tokenizer.normalizer
        added = list(hf_tokenizer.get_added_tokens_decoder().values())
    except (AttributeError, TypeError, ValueError):
        return None
    if type(model).__name__ != "BPE" or getattr(model, "dropout", None) or normalizer is not None:
        return None
    stages = _stages(pre)
    if stages is None:
        return None
    plain = [t.content for t in added if not t.special]
    pattern = re.compile("|".join(re.escape(c) for c in plain)) if plain else None
    return WordEncoder(hf_tokenizer, stages, pattern)


def _stages(pre: dict) -> list[re.Pattern] | None:
    """The split patterns of a pre-tokenizer, in order; None for one not reproduced here."""
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not parts:
        return None
    stages: list[re.Pattern] = []
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            if part.get("add_prefix_space") or part is not parts[-1]:
                return None  # a space before each text's first word; or later splits see mapped bytes
            source = GPT2_PATTERN if part.get("use_regex", True) else None
        elif kind == "Digits":
            source = r"\p{N}" if part.get("individual_digits") else r"\p{N}+"
        elif kind == "Split":
            source = (part.get("pattern") or {}).get("Regex")
            if source is None or part.get("behavior") != "Isolated" or part.get("invert"):
                return None
        else:
            return None
        if source is not None:
            compiled = _ascii_compile(source)
            if compiled is None:
                return None
            stages.append(compiled)
    if parts[-1].get("type") != "ByteLevel" or not stages:
        return None  # (no split at all: the whole text is one word, nothing to remember)
    return stages


SAFE_CHARS = "".join(map(chr, range(0x20, 0x7F))) + "\t\n\r"
"""The only characters of the text this encoder cuts itself (see _UNSAFE)."""

_CATEGORIES = frozenset("L Lu Ll Lt Lm Lo M Mn Mc Me N Nd Nl No P Pc Pd Ps Pe Pi Pf Po S Sm Sc Sk So "
                        "Z Zs Zl Zp C Cc Cf Cs Co Cn".split())


def _category_chars(name: str) -> str | None:
    """Unicode general category `name` (L, Lu, P, ...) among SAFE_CHARS, as the inside of a `re`
    class; a category with none of them is a character never in such text (the class must stay
    valid and match nothing here). None for a name that is not a category."""
    if name not in _CATEGORIES:
        return None
    chars = "".join(re.escape(c) for c in SAFE_CHARS if unicodedata.category(c).startswith(name))
    return chars or r"\x80"


def _ascii_compile(source: str) -> re.Pattern | None:
    """`source` (a tokenizer's Oniguruma pattern) compiled by `re` for text of SAFE_CHARS: each
    \\p{...} general category becomes its characters there; None for a pattern using anything
    else beyond `re` (a negated \\P{...}, a script or property name, a class inside a class) or
    with groups (findall returns groups)."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(source):
        char = source[i]
        if char == "\\":
            escape = source[i:i + 2]
            if escape in ("\\p", "\\P"):
                end = source.find("}", i)
                name = source[i + 3:end] if escape == "\\p" and source[i + 2:i + 3] == "{" and end > 0 else ""
                chars = _category_chars(name)
                if chars is None:
                    return None
                out.append(chars if in_class else f"[{chars}]")
                i = end + 1
                continue
            out.append(escape)
            i += 2
            continue
        if char == "[":
            if in_class or source[i + 1:i + 2] == "]" or source[i + 1:i + 3] == "^]":
                return None  # (a class inside a class, or a leading "]": read differently by engines)
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    try:
        compiled = re.compile("".join(out))
    except re.error:
        return None
    return None if compiled.groups else compiled
