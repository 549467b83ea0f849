"""Tokenizers as the frontend sees them, and streaming detokenization with stop strings.

The frontend owns stop strings (not the engine) so every engine behaves the
same: text is decoded incrementally, a stop string ends the stream with the
text before it, and text that might be the start of a stop string is held
back until it is known not to be.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from dyn.config.recipe import ModelSpec
from dyn.errors import EngineError, RequestError
from dyn.frontend.token_cache import SegmentEncoder

_REPLACEMENT = "\ufffd"


class TextTokenizer(Protocol):
    eos_token_ids: Sequence[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: the special tokens and chat template (lm-eval's remote tokenizer)."""
        ...

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry `text` (a whole token), or None."""
        ...

    def chat_prompt(self, messages: Sequence[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant turn;
        `template_kwargs`: the request's chat_template_kwargs (e.g. Qwen3's enable_thinking).
        `continue_final_message`: the prompt ends inside the last (assistant) message, which the
        answer continues (vLLM's assistant prefill); `add_generation_prompt` False: no new turn."""
        ...


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes: mock deployments serve text with no checkpoint.

    The mock engine samples from a 32k vocabulary; ids >= 256 decode to one
    printable ASCII character each, so its output reads as text.
    """

    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def info(self) -> dict[str, Any]:
        return {"tokenizer_class": "ByteTokenizer", "bos_token": None, "eos_token": None, "pad_token": None,
                "chat_template": None}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(t if t < 256 else 33 + t % 94 for t in token_ids).decode("utf-8", "replace")

    def token_id(self, text: str) -> int | None:
        raw = text.encode("utf-8")
        return raw[0] if len(raw) == 1 else None

    def chat_prompt(self, messages: Sequence[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if continue_final_message:
            text = text[:-1]
        elif add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text)


class ModelTokenizer:
    """Adapter over dyn.engine.tokenizer.Tokenizer (the checkpoint's tokenizer and chat template)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.eos_token_ids = tuple(getattr(inner, "eos_token_ids", ()) or ())
        hf = getattr(inner, "hf_tokenizer", None)
        self._prompts = SegmentEncoder(hf) if hf is not None else None
        """Prompts (rendered chat, completions' text), encoded with their long pieces cached (shared
        system prompts) and the rest word by word where the tokenizer allows."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._prompts is not None:
            return self._prompts.encode(text, add_special_tokens)
        return list(self._inner.encode(text, add_special_tokens))

    def info(self) -> dict[str, Any]:
        inner = self._inner
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inner.bos_token,
                "eos_token": inner.eos_token, "pad_token": None, "chat_template": inner.chat_template}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode(list(token_ids), skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self._inner.token_to_id(text)

    def step_decoder(self, prefix_ids: Sequence[int], skip_special_tokens: bool = True,
                     spaces_between_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """Hugging Face's incremental decoder (`tokenizers.decoders.DecodeStream`) after
        `prefix_ids`: each call takes one token and returns its new text, or None while a
        character is incomplete. It decodes as TextStream's window does, in Rust: 1.6 us a token
        here, against 3.8 us for the two window decodes in Python (a streamed answer decodes
        every token). None where TextStream decodes its window instead: no Hugging Face tokenizer,
        one without DecodeStream(ids=...), or a prefix that ends inside a character.
        `spaces_between_special_tokens` False (with special tokens kept): vLLM's rule, see
        _JoinedAddedTokens."""
        hf = getattr(self._inner, "hf_tokenizer", None)
        if hf is None or self.decode(prefix_ids, skip_special_tokens).endswith(_REPLACEMENT):
            return None  # (DecodeStream would send such a prefix's text as new)
        try:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(ids=list(prefix_ids), skip_special_tokens=skip_special_tokens)
        except (ImportError, TypeError):
            return None
        step = partial(stream.step, hf)
        if skip_special_tokens or spaces_between_special_tokens:
            return step
        return _JoinedAddedTokens(step, self._added_tokens) if self._added_tokens else step

    @cached_property
    def _added_tokens(self) -> dict[int, str]:
        """Added token id -> its content (read once, for spaces_between_special_tokens false)."""
        added = self._inner.hf_tokenizer.get_added_tokens_decoder()
        return {token_id: token.content for token_id, token in added.items()}

    def chat_prompt(self, messages: Sequence[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        out = self._inner.apply_chat_template(list(messages),
                                              add_generation_prompt=add_generation_prompt and not continue_final_message,
                                              **(template_kwargs or {}))
        if not isinstance(out, str):
            return list(out)
        if continue_final_message:
            out = _up_to_final_message(out, messages[-1]["content"])
        # The template already writes BOS and friends: add no special tokens twice.
        if self._prompts is not None:
            return self._prompts.encode(out)
        return list(self._inner.encode(out, add_special_tokens=False))


def _up_to_final_message(rendered: str, content: str) -> str:
    """The rendered prompt cut right after the last message's text (what closes that turn goes),
    as vLLM cuts it for continue_final_message."""
    end = rendered.rfind(content) if content else -1
    if end < 0:
        raise RequestError("continue_final_message: the chat template does not write the last message's text "
                           "as given, so the prompt cannot end inside it", field="continue_final_message")
    return rendered[:end + len(content)]


def checkpoint_dir(model: ModelSpec) -> Path | None:
    """The checkpoint directory the frontend reads (tokenizer, generation_config.json); for a GGUF
    source, the same cached conversion the workers load (one conversion per node). None: a mock
    engine without tokenizer files."""
    from dyn.engine.sources import resolve_checkpoint, source_file

    if model.engine == "mock" and source_file(model.path) is None \
            and not (Path(model.path) / "tokenizer.json").is_file():
        return None
    return resolve_checkpoint(model.path, dtype=model.dtype)


def load_tokenizer(model: ModelSpec) -> TextTokenizer:
    """The checkpoint's tokenizer, or ByteTokenizer for `engine: mock` without tokenizer files."""
    directory = checkpoint_dir(model)
    if directory is None:
        return ByteTokenizer()
    try:
        from dyn.engine.tokenizer import Tokenizer
    except ImportError as exc:
        raise EngineError(f"cannot load the tokenizer of {model.path}: {exc}") from None
    return ModelTokenizer(Tokenizer.from_dir(directory))


class _JoinedAddedTokens:
    """vLLM's spaces_between_special_tokens=False on its fast (DecodeStream) detokenizer: an added
    token right after another added token is written as its bare content, without the space the
    decoder puts before it (WordPiece's "[SEP] [CLS]" becomes "[SEP][CLS]"). Byte-level BPE
    decoders put none, so there the text is the same either way."""

    def __init__(self, step: Callable[[int], str | None], added: dict[int, str]) -> None:
        self._step = step
        self._added = added
        self._after_added = False

    def __call__(self, token_id: int) -> str | None:
        text = self._step(token_id)
        content = self._added.get(token_id)
        if content is not None and self._after_added:
            text = content
        self._after_added = content is not None
        return text


class TextStream:
    """Incremental detokenizer for one request, applying stop strings.

    `add(token_ids)` returns the text that may be sent now; `stopped` turns
    True when a stop string matched (the matched text and anything after it
    are dropped); `flush()` returns the held-back tail at the end.

    Only a window of the text is kept: what is not sent yet and the last
    characters of what was (as many as a stop string could reach back). Growing
    the whole answer by `+=` copied it per token: 32K streamed tokens cost
    ~0.36 s of CPU, 11 us a token, and more the longer the answer.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = (), *, prefix_ids: Sequence[int] = (),
                 lazy: bool = False, include_stop: bool = False, min_tokens: int = 0,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        """`lazy`: nobody reads text before the end (no streaming, no stop strings): decode once in flush.
        `include_stop`: the matched stop string stays at the end of the text (vLLM's
        include_stop_str_in_output). `min_tokens`: a stop string must end in the text of a later
        token (vLLM's min_tokens; one that begins earlier still counts). `skip_special_tokens`
        False: special tokens are text too, and `spaces_between_special_tokens` False joins
        adjacent ones as vLLM does (token by token: such a request is never lazy) (vLLM's fields)."""
        joined = not (skip_special_tokens or spaces_between_special_tokens)
        self._decode = tokenizer.decode if skip_special_tokens else partial(tokenizer.decode, skip_special_tokens=False)
        self._include_stop = include_stop
        self._lazy = lazy and not stop and not joined
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._stop_heads = frozenset(s[:k] for s in self._stop for k in range(1, len(s)))
        """Every proper prefix of a stop string: a tail of the text among them is held back."""
        # Decode a window that starts a few tokens back so merges across token
        # boundaries (leading spaces, multi-byte characters) come out right.
        self._ids: list[int] = list(prefix_ids[-4:])
        self._prefix = len(self._ids)
        self._read = len(self._ids)
        self._step = None if self._lazy else _step_decoder(tokenizer, self._ids, skip_special_tokens,
                                                           spaces_between_special_tokens)
        """One token at a time in the tokenizer's own incremental decoder, where it has one."""
        self._text = ""
        """The window: the text not sent yet, after up to `_keep` characters that were."""
        self._sent = 0
        """Where the unsent text starts in the window."""
        self._keep = max(self._max_stop - 1, 0)
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._floor = 0
        """Where in the window a stop string may end at the earliest: after the text of the first
        min_tokens tokens."""
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        if self._num_tokens < self._min_tokens < self._num_tokens + len(token_ids) and self._stop:
            cut = self._min_tokens - self._num_tokens  # (the tokens from min_tokens on are checked)
            return self.add(token_ids[:cut]) + self.add(token_ids[cut:])
        self._num_tokens += len(token_ids)
        if self._step is not None:
            return self._add_stepped(token_ids)
        self._ids.extend(token_ids)
        if self._lazy:
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if now.endswith(_REPLACEMENT) or len(now) <= len(before):
            return ""  # an incomplete character: wait for the next token
        start = len(self._text)
        self._text += now[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        if self._stop:
            return self._check_stop(start)
        return self._take(len(self._text))

    def _add_stepped(self, token_ids: Sequence[int]) -> str:
        ids, step, start = self._ids, self._step, len(self._text)
        for token_id in token_ids:
            ids.append(token_id)
            new = step(token_id)
            if new is not None:  # (the tokens up to here are text now; flush decodes any after)
                self._text += new
                self._prefix, self._read = self._read, len(ids)
        if len(self._text) == start:
            return ""
        if self._stop:
            return self._check_stop(start)
        return self._take(len(self._text))

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self._lazy:
            self._lazy = False
            # Decode with the prompt's tail in front, as the streaming path does, so
            # token merges at the boundary (leading spaces) come out the same.
            head = self._decode(self._ids[:self._prefix])
            full = self._decode(self._ids)
            self._text = full[len(head):] if full.startswith(head) else self._decode(self._ids[self._prefix:])
            self._read = len(self._ids)
        elif self._read < len(self._ids):
            # Tokens held back for an incomplete character: no later token completes it now, so
            # they go out as decoded (replacement characters included). Dropping them made the
            # text depend on chunk boundaries: a chunk of several tokens held back whole.
            before = self._decode(self._ids[self._prefix:self._read])
            now = self._decode(self._ids[self._prefix:])
            start = len(self._text)
            self._text += now[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            out = self._check_stop(start) if self._stop else ""
            return out if self.stopped else out + self._take(len(self._text))
        return self._take(len(self._text))

    def _check_stop(self, new_from: int) -> str:
        if self._num_tokens <= self._min_tokens:
            self._floor = len(self._text)
        search_from = max(0, new_from - self._max_stop + 1)
        first, matched = -1, ""
        for stop in self._stop:
            idx = self._text.find(stop, max(search_from, self._floor - len(stop) + 1))
            if idx != -1 and (first == -1 or idx < first):
                first, matched = idx, stop
        if first != -1:
            self.stopped = True
            end = first + len(matched) if self._include_stop else first
            out = self._text[self._sent:end]
            self._text = self._text[:end]
            self._sent = end
            return out
        hold = 0
        for k in range(min(self._max_stop - 1, len(self._text) - self._sent), 0, -1):
            if self._text[-k:] in self._stop_heads:
                hold = k
                break
        return self._take(len(self._text) - hold)

    def _take(self, end: int) -> str:
        out = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        drop = self._sent - self._keep
        if drop > 0:  # sent and out of a stop string's reach: the window moves on
            self._text = self._text[drop:]
            self._sent -= drop
            self._floor = max(self._floor - drop, 0)
        return out


def _step_decoder(tokenizer: TextTokenizer, prefix_ids: list[int], skip_special_tokens: bool,
                  spaces_between_special_tokens: bool) -> Callable[[int], str | None] | None:
    make = getattr(tokenizer, "step_decoder", None)
    return make(prefix_ids, skip_special_tokens, spaces_between_special_tokens) if make is not None else None
