"""Encode prompts piecewise, remembering the long pieces (shared system prompts).

Agent and chat traffic repeats long system prompts and conversation prefixes;
tokenizing them again for every request was the frontend's largest cost per
request (~25% of its CPU on a 450-token shared-prefix workload). A Hugging
Face tokenizer cuts the text at its added tokens (special ones, and plain ones
matched unnormalized, like Qwen 3's <think> and <tool_call>) before it
normalizes or pre-tokenizes anything, so the text between two of them encodes
the same on its own as inside the whole prompt. This encoder splits a rendered
prompt there, joins the short pieces between long ones, and takes every such
segment from an LRU cache: long pieces are shared system prompts, short ones
mostly the template's role headers (`<|start_header_id|>user<|end_header_id|>`),
each an encode call of ~6 us for a dict lookup. What the cache misses (a new
user turn) is encoded word by word where the tokenizer allows it
(dyn.frontend.word_cache), each word's ids remembered.

Exactness is not assumed: the split is used only for special tokens that
strip nothing and are matched unnormalized, and the first `verify_calls`
prompts are also encoded whole and compared; one difference turns the cache
off for good (logged).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Callable

from dyn.frontend.word_cache import batch_encoder, word_encoder

log = logging.getLogger(__name__)

MIN_CACHED_CHARS = 256
"""Pieces shorter than this are joined with their short neighbours into one segment (one encode
call on a miss; the cache key is the joined text)."""


class SegmentEncoder:
    """`encode(text, add_special_tokens)` == tokenizer.encode(text, add_special_tokens).ids, faster
    on repeats."""

    def __init__(self, hf_tokenizer: Any, *, max_entries: int = 4096, max_chars: int = 64 << 20,
                 verify_calls: int = 64) -> None:
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        """Guards the cache: the frontend encodes long prompts on threads beside its event loop."""
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._chars = 0
        self._verify_left = verify_calls
        self.hits = 0
        self.misses = 0
        self._split, self._added_ids = _added_splitter(hf_tokenizer) or (None, {})
        self._encode_batch = batch_encoder(hf_tokenizer)
        self.enabled = self._split is not None
        self._words = word_encoder(hf_tokenizer) if self.enabled else None
        """Encodes what the cache misses word by word (dyn.frontend.word_cache); None: whole."""
        self._wrap = _special_wrap(hf_tokenizer) if self.enabled else None
        """The ids the tokenizer adds before and after a text with add_special_tokens (BOS)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        wrap = self._wrap
        if not self.enabled or (add_special_tokens and wrap is None):
            return self._whole(text, add_special_tokens)
        ids = self._pieces(text) if len(text) >= 2 * MIN_CACHED_CHARS else self._fresh(text)
        if add_special_tokens:
            ids = wrap[0] + ids + wrap[1]  # type: ignore[index]
        if self._verify_left > 0:
            self._verify_left -= 1
            whole = self._whole(text, add_special_tokens)
            if whole != ids:
                log.warning("piecewise or word-by-word encoding differs from the tokenizer's for this model: "
                            "prompt cache off")
                self.enabled = False
                self._words = None
                with self._lock:
                    self._cache.clear()
                    self._chars = 0
                return whole
        return ids

    def _fresh(self, text: str) -> list[int]:
        """`text` encoded without the piece cache: word by word where the tokenizer allows."""
        words = self._words
        if words is None:
            return self._whole(text)
        ids: list[int] = []
        added_ids = self._added_ids
        for piece in self._split(text):  # type: ignore[misc]
            added = added_ids.get(piece)
            if added is None:
                ids += words.encode(piece)
            else:
                ids.append(added)
        return ids

    def _whole(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._encode_batch([text], add_special_tokens)[0]

    def _pieces(self, text: str) -> list[int]:
        ids: list[int] = []
        pending: list[str] = []
        for piece in self._split(text):  # type: ignore[misc]
            if len(piece) < MIN_CACHED_CHARS:
                pending.append(piece)
                continue
            if pending:
                ids += self._cached("".join(pending))
                pending.clear()
            ids += self._cached(piece)
        if pending:
            ids += self._cached("".join(pending))
        return ids

    def _cached(self, piece: str) -> list[int]:
        cache = self._cache
        with self._lock:
            hit = cache.get(piece)
            if hit is not None:
                cache.move_to_end(piece)
                self.hits += 1
                return hit
            self.misses += 1
        ids = self._fresh(piece)  # (outside the lock: long prompts encode on threads, dyn.frontend.app)
        with self._lock:
            if piece not in cache:  # another thread may have encoded it meanwhile
                cache[piece] = ids
                self._chars += len(piece)
            while cache and (len(cache) > self._max_entries or self._chars > self._max_chars):
                old, _ = cache.popitem(last=False)
                self._chars -= len(old)
        return ids


def _special_wrap(hf_tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer's post-processor puts before and after a text's own ids when asked to
    add special tokens (BOS, or BOS and EOS); None when it does anything else (checked on two
    texts)."""
    wraps = set()
    for sample in ("a", "Hello, world!\n12"):
        try:
            plain = hf_tokenizer.encode(sample, add_special_tokens=False).ids
            full = hf_tokenizer.encode(sample, add_special_tokens=True).ids
        except (AttributeError, TypeError):
            return None
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        if not starts:
            return None
        wraps.add((tuple(full[:starts[0]]), tuple(full[starts[0] + len(plain):])))
    if len(wraps) != 1:
        return None
    before, after = wraps.pop()
    return list(before), list(after)


def _added_splitter(hf_tokenizer: Any) -> tuple[Callable[[str], list[str]], dict[str, int]] | None:
    """A function cutting text before and after every added token that leaves its neighbours as
    they are (no space stripping, not single-word, matched unnormalized), and those tokens' ids;
    None when a special token is not such a one. (A plain added token that does change its
    neighbours stays inside its piece, which the word encoder leaves to the tokenizer whole.)"""
    try:
        added = hf_tokenizer.get_added_tokens_decoder()
    except AttributeError:
        return None
    special = [t for t in added.values() if getattr(t, "special", False)]
    changes_neighbours = lambda t: t.lstrip or t.rstrip or t.single_word or t.normalized  # noqa: E731
    if not special or any(map(changes_neighbours, special)):
        return None
    ids = {t.content: i for i, t in added.items() if not changes_neighbours(t)}
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + ")")
    return (lambda text: [p for p in pattern.split(text) if p]), ids
