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
  a BPE model without dropout, and no normalizer or NFC only (Qwen's); with
  NFC, only text already in NFC is cut here (a substring of NFC text is NFC,
  so each word is what the tokenizer would see) and none with a character
  Python's Unicode data does not assign (a text normalized under one Unicode
  version stays so under later ones only without such characters);
* the split patterns are written for Oniguruma, the tokenizers library's regex
  engine. `re` reads them the same once each one-character class in them
  (\\p{..}, \\P{..}, \\s, \\d, \\w, `.`, their negations, and the Digits
  pre-tokenizer's char::is_numeric) is spelled out as the characters that
  engine matches. Those are asked of the engine itself, once per process, over
  every code point of the first two Unicode planes (every script in use,
  symbols, emoji), so neither side's Unicode version matters. A pattern using
  anything else the two engines might read differently (anchors, inline flags,
  word boundaries, escapes that differ) gets no word encoder;
* `re`'s classes hold first-plane characters only (with the second plane's in
  them it tries their ranges one by one for every character a class does not
  hold: prompts took 4-5x longer), so a second-plane character (emoji, math
  letters) is cut as a first-plane stand-in that every class of the patterns
  holds exactly when the engine holds the original, and that no literal of the
  patterns names; the text is then cut at the same offsets (one character for
  one). Text with a character beyond (rare CJK ideographs, lone surrogates),
  or without a stand-in, goes to the tokenizer whole, and so does, for a
  pattern with a case-insensitive group, text with a non-ASCII character that
  case-maps to one of the group's letters (ſ, ß: the engines fold case
  differently);
* text holding an added token goes to the tokenizer whole (it cuts those out
  before pre-tokenizing; SegmentEncoder cuts out those it matches in the raw
  text first, so this is a plain one matched after normalizing);
* text with a word that the pattern would cut differently on its own goes to
  the tokenizer whole (that word's ids alone might not be its ids in the text).
SegmentEncoder also compares its first prompts with the tokenizer's own ids.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""ByteLevel's own split when use_regex is true (the tokenizers library's GPT-2 pattern)."""

MAX_WORDS = 1 << 16
"""Words remembered; the dict is emptied when full (common words come back on the next prompts)."""

SECOND_PLANE = 0x10000
SECOND_PLANE_CHARS = r"\U00010000-\U0001ffff"
OUTSIDE_ALPHABET = r"\ud800-\udfff\U00020000-\U0010ffff"
"""Code points never cut here (`re` class bodies): surrogates and every plane after the second (the
second is cut through stand-ins, when the patterns allow them)."""

_SECOND_PLANE = re.compile(f"[{SECOND_PLANE_CHARS}]")

DIGITS = "Digits"
"""The class of the Digits pre-tokenizer (Rust's char::is_numeric), named like a pattern's atoms."""


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

    def __init__(self, hf_tokenizer: Any, stages: list[re.Pattern], unsafe: re.Pattern, nfc: bool = False,
                 stand_ins: array | None = None) -> None:
        self._stages = stages
        self._unsafe = unsafe
        """Text matching it goes to the tokenizer whole: characters not cut here, added tokens."""
        self._nfc = nfc
        """The tokenizer normalizes to NFC: text not in NFC goes to it whole."""
        self._stand_ins = stand_ins
        """Second-plane character (ord - SECOND_PLANE) -> its first-plane stand-in's ord, 0 for none."""
        self._words: dict[str, list[int]] = {}
        self._encode_batch = batch_encoder(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        known = self._words
        whole = known.get(text)  # a short piece (a role name) is often one known word
        if whole is not None:
            return list(whole)
        if self._unsafe.search(text) or (self._nfc and not unicodedata.is_normalized("NFC", text)):
            return self._encode_batch([text], False)[0]
        words = self._cut(text)
        if words is None:
            return self._encode_batch([text], False)[0]
        ids = list(map(known.get, words))
        if None in ids and not self._learn(words, ids):
            return self._encode_batch([text], False)[0]
        return list(chain.from_iterable(ids))

    def _cut(self, text: str) -> list[str] | None:
        """`text`'s words; with second-plane characters, cut as their stand-ins and sliced back at the
        same offsets (one character for one); None when one has no stand-in."""
        stand_ins = self._stand_ins
        beyond = _SECOND_PLANE.findall(text) if stand_ins is not None else None
        if not beyond:
            return self._split(text)
        if not all(stand_ins[ord(c) - SECOND_PLANE] for c in beyond):  # type: ignore[index]
            return None
        pieces = self._split(_SECOND_PLANE.sub(lambda m: chr(stand_ins[ord(m.group()) - SECOND_PLANE]), text))
        words, pos = [], 0
        for piece in pieces:
            words.append(text[pos:pos + len(piece)])
            pos += len(piece)
        return words

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
        if any(self._cut(word) != [word] for word in new):
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
    nfc = _nfc_only(normalizer)
    if type(model).__name__ != "BPE" or getattr(model, "dropout", None) or nfc is None:
        return None
    patterns = _stages(pre)
    if patterns is None:
        return None
    hazards = _case_hazards("".join(p.folded for p in patterns))
    stand_ins = _stand_ins(patterns, hazards)
    outside = (OUTSIDE_ALPHABET + ("" if stand_ins is not None else SECOND_PLANE_CHARS)
               + "".join(map(_escape, hazards)) + (_unassigned() if nfc else ""))
    unsafe = [f"[{outside}]", *(re.escape(t.content) for t in added if not t.special)]
    return WordEncoder(hf_tokenizer, [p.regex for p in patterns], re.compile("|".join(unsafe)), nfc, stand_ins)


def _nfc_only(normalizer: Any) -> bool | None:
    """False for no normalizer (or an empty sequence), True for NFC alone, None for any other."""
    if normalizer is None:
        return False
    try:
        spec = json.loads(normalizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None
    parts = spec.get("normalizers") if spec.get("type") == "Sequence" else [spec]
    kinds = {part.get("type") for part in parts or []}
    return None if kinds - {"NFC"} else bool(kinds)


@dataclass(frozen=True)
class _Pattern:
    """A split pattern as `re` runs it, and what stand-ins for second-plane characters must respect."""

    regex: re.Pattern
    atoms: frozenset[str]
    """Its one-character classes (\\p{L}, \\s, ., DIGITS)."""
    literals: tuple[tuple[int, int], ...] = ()
    """Code point ranges its literals may name (more than it names: every character of the source
    outside a class atom, and all between a class's lowest and highest literal)."""
    folded: str = ""
    """The letters of its case-insensitive groups."""


def _stages(pre: dict) -> list[_Pattern] | None:
    """The split patterns of a pre-tokenizer, in order; None for a pre-tokenizer not reproduced here."""
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not parts:
        return None
    stages: list[_Pattern] = []
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            if part.get("add_prefix_space") or part is not parts[-1]:
                return None  # a space before each text's first word; or later splits see mapped bytes
            source = GPT2_PATTERN if part.get("use_regex", True) else None
        elif kind == "Digits":
            numeric = _engine_class(DIGITS)
            if numeric is None:
                return None
            regex = re.compile(f"[{numeric}]" if part.get("individual_digits") else f"[{numeric}]+")
            stages.append(_Pattern(regex, frozenset({DIGITS})))
            continue
        elif kind == "Split":
            source = (part.get("pattern") or {}).get("Regex")
            if source is None or part.get("behavior") != "Isolated" or part.get("invert"):
                return None
        else:
            return None
        if source is not None:
            translated = _translate(source)
            if translated is None:
                return None
            stages.append(translated)
    if parts[-1].get("type") != "ByteLevel" or not stages:
        return None  # (no split at all: the whole text is one word, nothing to remember)
    return stages


_CLASS_ATOM = re.compile(r"\\[pP]\{\w+\}|\\[sSdDwWhH]")
"""One-character classes whose characters are asked of the tokenizers library's engine."""

_SAME_ESCAPE = re.compile(r"\\(?:[tnrfv]|x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|[^0-9A-Za-z])")
"""Escapes both engines read alike: control characters, hex code points, escaped symbols."""

_GROUPS = ("(?:", "(?=", "(?!", "(?<=", "(?<!", "(?>")
"""Group openings both engines read alike (non-capturing, look-around, atomic)."""


@functools.cache
def _translate(source: str) -> _Pattern | None:
    """`source` (a tokenizer's Oniguruma pattern) compiled by `re` to cut text of the alphabet as
    Oniguruma does; None for a pattern using what the two engines might read differently: anchors
    (^ and $ are line anchors in Oniguruma's Ruby syntax), word boundaries and other escapes, inline
    flags but a (?i:...) of plain ASCII, a class inside a class, a possessive {n,m}+ (a quantifier
    then + in Ruby syntax), capture groups (findall would return them)."""
    out: list[str] = []
    atoms: set[str] = set()
    literals: list[tuple[int, int]] = []
    in_class: list[int] | None = None  # (inside a class: the code points of its literals)
    folded = ""
    i = 0
    while i < len(source):
        char = source[i]
        atom = _CLASS_ATOM.match(source, i)
        if atom is not None or (char == "." and in_class is None):
            name = atom.group() if atom is not None else char
            chars = _engine_class(name)
            if chars is None:
                return None
            atoms.add(name)
            out.append(chars if in_class is not None else f"[{chars}]")
            i += len(name)
            continue
        if char == "\\":
            escape = _SAME_ESCAPE.match(source, i)
            if escape is None:
                return None
            named = escape.group()[1:]
            code = int(named[1:], 16) if named[0] in "xu" and len(named) > 1 else ord(_CONTROLS.get(named, named))
            if in_class is not None:
                in_class.append(code)
            literals.append((code, code))
            out.append(escape.group())
            i = escape.end()
            continue
        if in_class is not None:
            if char == "[":
                return None
            if char == "]":
                if in_class:
                    literals.append((min(in_class), max(in_class)))  # (covers every a-z range in it)
                in_class = None
            else:
                in_class.append(ord(char))
        elif char == "[":
            if source.startswith(("[]", "[^]"), i):
                return None  # (a leading "]": read differently by engines)
            in_class = []
        elif char in "^$" or (char == "+" and out and out[-1] == "}"):
            return None
        elif source.startswith("(?i:", i):
            end = source.find(")", i)
            group = source[i + 4:end]
            if end < 0 or not group.isascii() or any(c in group for c in "\\[(."):
                return None
            folded += "".join(c for c in group if c.isalpha())
            literals += ((ord(c), ord(c)) for c in group)
            out.append(source[i:end + 1])
            i = end + 1
            continue
        elif source.startswith("(?", i) and not source.startswith(_GROUPS, i):
            return None
        literals.append((ord(char), ord(char)))
        out.append(char)
        i += 1
    try:
        compiled = re.compile("".join(out))
    except re.error:
        return None
    return None if compiled.groups else _Pattern(compiled, frozenset(atoms), tuple(literals), folded)


_CONTROLS = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}


@functools.cache
def _alphabet(plane: int = 0) -> str:
    """Every code point of the first plane but the surrogates (63,488 characters), or of the
    second (65,536): what is cut here (see OUTSIDE_ALPHABET)."""
    if plane:
        return "".join(map(chr, range(SECOND_PLANE, 2 * SECOND_PLANE)))
    return "".join(map(chr, chain(range(0xD800), range(0xE000, SECOND_PLANE))))


@functools.cache
def _engine_members(atom: str, plane: int = 0) -> bytes | None:
    """Which characters of plane `plane`'s alphabet the tokenizers library matches with the
    one-character class `atom` (\\p{L}, \\s, ., ...; DIGITS for its Digits pre-tokenizer), one byte
    (0 or 1) a character, asked of the library itself (20-60 ms, once per process); None when its
    engine rejects `atom`."""
    from tokenizers import Regex, pre_tokenizers

    alphabet = _alphabet(plane)
    members = bytearray(len(alphabet))
    if atom == DIGITS:
        # Each character between two "a"s (never numeric): a numeric one is a piece of its own.
        text = "a".join(alphabet)
        pieces = pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str(text)
        for piece, (start, end) in pieces:
            if end - start == 1 and start % 2 == 0:
                members[start // 2] = 1
    else:
        try:
            split = pre_tokenizers.Split(Regex(f"(?:{atom})+"), behavior="removed")
        except Exception:  # the library raises its own error type for a pattern it cannot compile
            return None
        text = alphabet
        pieces = split.pre_tokenize_str(text)
        members[:] = b"\x01" * len(alphabet)
        for _, (start, end) in pieces:
            members[start:end] = bytes(end - start)  # what is left is what the class does not match
    if any(piece != text[start:end] for piece, (start, end) in pieces):
        return None  # (offsets not in characters: a library version this reading does not know)
    return bytes(members)


@functools.cache
def _engine_class(atom: str) -> str | None:
    """The first-plane characters the tokenizers library matches with `atom`, as a `re` class body
    (None: see _engine_members). Runs of the alphabet's order become ranges: the surrogates between
    two of its characters are never in text cut here."""
    members = _engine_members(atom)
    if members is None:
        return None
    alphabet = _alphabet()
    ranges = [(alphabet[m.start()], alphabet[m.end() - 1]) for m in re.finditer(rb"\x01+", members)]
    body = "".join(_escape(lo) if lo == hi else f"{_escape(lo)}-{_escape(hi)}" for lo, hi in ranges)
    return body or r"\ud800"  # (nothing: a surrogate, never in text cut here)


def _stand_ins(patterns: list[_Pattern], avoid: str) -> array | None:
    """For each second-plane character, a first-plane one that every class atom of `patterns`
    holds exactly when the engine holds the original, named by no literal of theirs and not in
    `avoid`, so `re` cuts text with it where the tokenizer cuts the original (its ord; 0: none).
    None when a pattern's literals reach the second plane or the engine cannot say."""
    import numpy as np

    atoms = sorted(set().union(*(p.atoms for p in patterns)))
    literals = [r for p in patterns for r in p.literals]
    if len(atoms) > 62 or any(hi >= SECOND_PLANE for _, hi in literals):
        return None
    signatures = []
    for plane in (0, 1):
        signature = np.zeros(len(_alphabet(plane)), dtype=np.int64)
        for bit, atom in enumerate(atoms):
            members = _engine_members(atom, plane)
            if members is None:
                return None
            signature |= np.frombuffer(members, dtype=np.uint8).astype(np.int64) << bit
        signatures.append(signature)
    first, second = signatures
    codes = np.frombuffer(_alphabet().encode("utf-32-le"), dtype=np.uint32)
    usable = codes != 0  # (0 says "none" in the table)
    for lo, hi in literals:
        usable &= (codes < lo) | (codes > hi)
    usable &= ~np.isin(codes, [ord(c) for c in avoid])
    kinds, where = np.unique(first[usable], return_index=True)
    stand_in = dict(zip(kinds.tolist(), codes[usable][where].tolist()))
    return array("I", (stand_in.get(kind, 0) for kind in second.tolist()))


@functools.cache
def _case_hazards(letters: str) -> str:
    """Non-ASCII characters (of both planes) whose case mappings hold one of `letters` (a
    case-insensitive group's): Python's `re` folds with simple mappings (İ matches i), Oniguruma
    with full case folding (ß matches ss), so text holding one goes to the tokenizer whole."""
    wanted = set(letters.lower())
    if not wanted:
        return ""
    return "".join(c for c in _alphabet() + _alphabet(1) if not c.isascii()
                   and wanted & set((c.lower() + c.upper() + c.casefold()).lower()))


@functools.cache
def _unassigned() -> str:
    """The code points of both planes Python's Unicode data does not assign, as a `re` class body."""
    out = []
    for plane in (0, 1):
        alphabet = _alphabet(plane)
        gaps = bytes(unicodedata.category(c) == "Cn" for c in alphabet)
        out += (f"{_escape(alphabet[m.start()])}-{_escape(alphabet[m.end() - 1])}"
                for m in re.finditer(rb"\x01+", gaps))
    return "".join(out)


def _escape(char: str) -> str:
    return f"\\U{ord(char):08x}"
