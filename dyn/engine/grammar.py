"""Structured output for the torch engine: grammars over the model's vocabulary.

xgrammar (the library vLLM and SGLang use) compiles a JSON schema, a regular expression or an
EBNF grammar (SamplingParams.structured) against the tokenizer's vocabulary once and, per
request, keeps a matcher that says which tokens may come next: a bitmask applied to the logits
before sampling. Logprobs stay the model's own (the mask only
narrows what is sampled), as vLLM reports them by default. Loaded on the first request that asks
(transformers and xgrammar cost seconds to import); a worker without xgrammar refuses such
requests naming the extra to install.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dyn.errors import EngineError, RequestError

INSTALL_HINT = "pip install xgrammar (dyn's 'structured' extra; vLLM brings it too)"
MAX_COMPILED = 256
"""Compiled grammars a worker keeps (an agent framework sends the same few schemas over and over)."""
Structured = tuple[str, str]
"""SamplingParams.structured: (kind, text), kind "json", "regex" or "grammar"."""
_FIELDS = {"json": "response_format", "regex": "regex", "grammar": "grammar"}
"""What a request that cannot be compiled is refused for, per kind."""


class Grammars:
    """One engine's grammar compiler: its vocabulary and a cache of compiled schemas."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError as exc:
            raise RequestError(f"structured output needs xgrammar on the worker ({exc}); {INSTALL_HINT}",
                               field="response_format") from None
        path = Path(tokenizer_dir) / "tokenizer.json"
        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=list(stop_token_ids) or None)
        except Exception as exc:  # (transformers and xgrammar raise many types for a tokenizer they cannot read)
            raise EngineError(f"structured output cannot use the tokenizer {path}: {exc}") from None
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compile = {"json": self._compiler.compile_json_schema, "regex": self._compiler.compile_regex,
                         "grammar": self._compiler.compile_grammar}
        self._compiled: dict[Structured, Any] = {}
        """(kind, text) -> its compiled grammar, the newest MAX_COMPILED (read on the engine thread,
        filled by `compile` on any thread: single dict operations, atomic under the GIL)."""
        self.vocab_size = vocab_size

    def is_compiled(self, structured: Structured) -> bool:
        return structured in self._compiled

    def compile(self, structured: Structured) -> Any:
        """The grammar, compiled once (a large schema takes xgrammar a second; it lets go of the
        GIL meanwhile); RequestError for one xgrammar cannot compile."""
        compiled = self._compiled.get(structured)
        if compiled is not None:
            return compiled
        kind, text = structured
        try:
            compiled = self._compile[kind](text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RequestError(f"the {_FIELDS[kind]} cannot be used: {exc}", field=_FIELDS[kind]) from None
        if len(self._compiled) >= MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)), None)
        self._compiled[structured] = compiled
        return compiled

    def constraint(self, structured: Structured) -> "Constraint":
        """A fresh matcher for one request (compiling its grammar here if nobody did before)."""
        return Constraint(self._xgr.GrammarMatcher(self.compile(structured)), self)

    def apply(self, logits: Any, rows: Sequence[tuple[int, "Constraint"]]) -> None:
        """Mask `logits` [n, vocab] in place: row i keeps only what its constraint allows next."""
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for row, constraint in rows:
            constraint.matcher.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                        indices=[row for row, _ in rows])


class Constraint:
    """One request's grammar state: what may come next, advanced token by token."""

    def __init__(self, matcher: Any, grammars: Grammars) -> None:
        self.matcher = matcher
        self.grammars = grammars

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (state unchanged) when the grammar does not allow it."""
        return self.matcher.accept_token(token_id)

    @property
    def done(self) -> bool:
        """The answer is complete and its stop token taken: nothing may follow."""
        return self.matcher.is_terminated()
