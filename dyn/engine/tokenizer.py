"""Tokenizer of a Hugging Face model directory, on the `tokenizers` library (no transformers).

`tokenizer.json` does the encoding (its post-processor adds BOS when asked);
`tokenizer_config.json` supplies the chat template, rendered in a sandboxed
jinja2 environment like transformers' (dyn.engine.chat_template). A rendered chat
prompt usually carries its own BOS, so encode it with `add_special_tokens=False`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dyn.engine.chat_template import compile_chat_template
from dyn.engine.loader import CheckpointError
from dyn.errors import RequestError


class Tokenizer:
    """Encode, decode, chat template and EOS ids of one model."""

    def __init__(self, tokenizer: Any, *, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, extra_eos_ids: tuple[int, ...] = (), source: str = "") -> None:
        self._tok = tokenizer
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template, source) if chat_template else None
        eos = [tokenizer.token_to_id(eos_token)] if eos_token else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in [*eos, *extra_eos_ids] if i is not None))
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (+ tokenizer_config.json, config.json, generation_config.json eos ids)."""
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError("tokenizer.json not found (only fast tokenizers are supported)", path=root)
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception subclass on bad JSON
            raise CheckpointError(f"cannot load tokenizer: {exc}", path=tok_file) from exc
        # A tokenizer.json may carry the training run's truncation or padding; transformers (and so
        # vLLM) turn both off unless a call asks, else a long prompt would be cut without a word.
        tok.no_truncation()
        tok.no_padding()
        cfg = _read_optional_json(root / "tokenizer_config.json")
        extra: list[int] = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_optional_json(root / name).get("eos_token_id")
            extra.extend([eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)])
        return cls(tok, chat_template=_pick_template(cfg.get("chat_template"), root),
                   bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   extra_eos_ids=tuple(extra), source=str(root))

    @property
    def hf_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` underneath (the frontend's prompt cache reads its added tokens)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render OpenAI-style messages. Raises RequestError for bad messages or a template refusal."""
        if self._template is None:
            raise RequestError(f"the model at {self.source} has no chat template; use a plain completion",
                               field="messages")
        _check_messages(messages)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TemplateError as exc:
            raise RequestError(f"chat template rejected the messages: {exc}", field="messages") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            # a client's chat_template_kwargs of a type the template does not expect
            where = "chat_template_kwargs" if kwargs.keys() - {"tools"} else "messages"
            raise RequestError(f"chat template failed on the request's {where}: {type(exc).__name__}: {exc}",
                               field=where) from None

    def detokenizer(self, prompt_ids: list[int] | None = None,
                    skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """`Tokenizer.from_dir(path)` (the name dyn.engine.factory looks up)."""
    return Tokenizer.from_dir(path)


class IncrementalDetokenizer:
    """Turns a growing token stream into text deltas, never emitting half a UTF-8 character.

    Each delta is the difference between decoding a short window of recent
    tokens with and without the new ones; decoding a window (not one token)
    keeps tokenizers that strip a leading space or merge bytes correct.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, *,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids or [])
        self._read = len(self.token_ids)
        self._prefix = max(self._read - 6, 0)
        self.text = ""
        """All text emitted so far."""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (may be '')."""
        self.token_ids.extend(token_ids)
        before = self._tok.decode(self.token_ids[self._prefix:self._read], self._skip)
        after = self._tok.decode(self.token_ids[self._prefix:], self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever is left, with U+FFFD for a truncated character."""
        before = self._tok.decode(self.token_ids[self._prefix:self._read], self._skip)
        after = self._tok.decode(self.token_ids[self._prefix:], self._skip)
        delta = after[len(before):] if after.startswith(before) else ""
        self._prefix = self._read = len(self.token_ids)
        self.text += delta
        return delta


def _pick_template(value: Any, root: Path) -> str | None:
    if value is None:
        jinja = root / "chat_template.jinja"
        return jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError("chat_template must be a string or a list with a 'default' entry",
                          path=root / "tokenizer_config.json")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not valid JSON: {exc}", path=path) from None
    return raw if isinstance(raw, dict) else {}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] needs a string 'role'", field=f"messages[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts",
                               field=f"messages[{i}].content")
