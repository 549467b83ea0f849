"""`SamplingParams`: how to generate, one typed value from the HTTP edge to the engine.

The frontend builds it once from the validated request body (dyn.frontend.protocol),
it travels inside GenerateRequest (the codec checks each field's type on receipt),
and the engine reads it as is. Engines still check the values they depend on
(ranges, vocabulary) as their own guard.
"""

from __future__ import annotations

from dataclasses import dataclass


MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on top_logprobs."""
MAX_LOGIT_BIAS = 100.0
"""OpenAI's range for a logit_bias value: [-100, 100]."""
MAX_BAD_WORD_SEQUENCES = 128
"""bad_words' token sequences at most (vLLM's VLLM_MAX_NUM_BAD_WORDS default)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = 16
    """Tokens to generate at most. None (only before the prompt is known): up to the model's
    context; the frontend resolves it before a request leaves, and engines require an int."""
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the likeliest one (after temperature); 0: none."""
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    """Besides the model's EOS ids (unless ignore_eos)."""
    stop: tuple[str, ...] = ()
    """Stop strings; checked by the engine's detokenizer when it has one."""
    ignore_eos: bool = False
    min_tokens: int = 0
    """EOS and stop_token_ids cannot end the answer before this many tokens (vLLM's min_tokens)."""
    logprobs: bool = False
    top_logprobs: int = 0
    """With logprobs: also the this-many likeliest tokens at each position, with their logprobs."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already holds (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence in the output so far."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or output; 1: none."""
    json_schema: str | None = None
    """Structured output: the answer is JSON matching this JSON schema (as JSON text; OpenAI's
    response_format json_object is the schema {"type": "object"}); None: free text."""
    regex: str | None = None
    """Structured output: the answer matches this regular expression (vLLM's guided_regex)."""
    grammar: str | None = None
    """Structured output: the answer is a sentence of this EBNF grammar (GBNF, as xgrammar reads
    it: vLLM's guided_grammar; guided_choice arrives as a grammar of its choices). At most one
    of json_schema, regex and grammar is set."""
    logit_bias_ids: tuple[int, ...] = ()
    """OpenAI's logit_bias: these tokens' logits get `logit_bias_values` added before sampling
    (-100 bans a token, 100 all but forces it); logprobs stay the model's."""
    logit_bias_values: tuple[float, ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    """vLLM's allowed_token_ids: only these may be sampled; empty: any."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """vLLM's bad_words, tokenized by the frontend: a sequence's last token may not be sampled
    where the output so far ends with the rest of it (a one-token sequence is never sampled)."""
    prompt_logprobs: int | None = None
    """Score the prompt: each prompt token's logprob given the tokens before it, and this many
    likeliest tokens at each of those positions (0: the prompt token's alone); None: off. The
    prompt then runs through the model whole (a cached prefix has no logits to read)."""

    @property
    def structured(self) -> tuple[str, str] | None:
        """The grammar the answer follows as (kind, text), kind named as in vLLM's
        StructuredOutputsParams ("json", "regex", "grammar"); None: free text."""
        for kind, text in (("json", self.json_schema), ("regex", self.regex), ("grammar", self.grammar)):
            if text is not None:
                return kind, text
        return None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(slots=True)
class PromptLogprobs:
    """SamplingParams.prompt_logprobs' answer: one entry per prompt token after the first (the
    first has nothing before it to be scored on), in prompt order."""

    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    """With prompt_logprobs k > 0: per position, the k likeliest tokens (most likely first) ..."""
    top_logprobs: list[list[float]] | None = None
    """... and their logprobs."""
    ranks: list[int] | None = None
    """Per position, the prompt token's rank in the vocabulary (1: the likeliest; tokens that
    score as high count ahead of it, as vLLM ranks); None where the engine gives none."""
