"""Per-request token sampling: penalties, logit bias, allowed tokens and bad words, greedy,
temperature, top-k, top-p, min-p, seeded streams.

A seeded request draws token i from a generator seeded by (seed, i), not from
a generator carried across steps. The stream is then a function of the request
alone: the same tokens come out whatever else shares the batch, after
preemption and recompute, and after a prefill/decode handoff to another worker.
Draws happen on the host, so CPU and CUDA runners agree for the same probs.
Penalties follow vLLM's (and OpenAI's) definitions and come first, so greedy
requests see them too; logprobs stay those of the unmodified model.
Parameter ranges are checked where requests enter (dyn.engine.engine).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from dyn.engine.backend import SamplingParams

_MASK63 = (1 << 63) - 1


class Sampled(NamedTuple):
    token_ids: list[int]
    logprobs: list[float | None]
    """Log-probability of each chosen token under the unmodified model distribution (None unless asked)."""
    top: list[tuple[list[int], list[float]] | None] | None = None
    """Per row with top_logprobs: its likeliest tokens and their logprobs, most likely first."""


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int],
           generator: torch.Generator | None = None, *,
           contexts: Sequence[Sequence[int]] | None = None,
           mask: Callable[[torch.Tensor], None] | None = None) -> Sampled:
    """Pick one token per row of float32 `logits` [n, vocab].

    `generator` (a host generator) serves unseeded random requests; seeded
    ones use their own stream. `contexts`: each row's prompt + generated tokens
    (the last `num_generated` are output), needed by requests with penalties or bad words.
    `mask`: narrows the rows of structured-output requests in place (their grammar), on a copy.
    """
    raw = logits
    if contexts is not None and any(p.penalized for p in params):
        logits = _penalized(logits, params, num_generated, contexts)  # (a copy)
    biased = any(p.logit_bias_ids or p.allowed_token_ids or p.bad_words_token_ids for p in params)
    if (biased or mask is not None) and logits is raw:
        logits = logits.clone()  # (the logprobs are read from `raw`)
    if biased:
        _bias(logits, params, num_generated, contexts or [()] * len(params))
    if mask is not None:
        mask(logits)
    n = logits.shape[0]
    tokens: list[int] = [0] * n
    greedy_rows = [i for i, p in enumerate(params) if p.temperature == 0.0 or p.top_k == 1]
    if greedy_rows:
        picked = logits[greedy_rows].argmax(dim=-1).tolist() if len(greedy_rows) < n else \
            logits.argmax(dim=-1).tolist()
        for row, tok in zip(greedy_rows, picked):
            tokens[row] = tok
    greedy = set(greedy_rows)
    for i, p in enumerate(params):
        if i in greedy:
            continue
        probs = _filtered_probs(logits[i], p).cpu()
        gen = generator
        if p.seed is not None:
            gen = torch.Generator().manual_seed(_stream_seed(p.seed, num_generated[i]))
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    logprobs: list[float | None] = [None] * n
    top: list[tuple[list[int], list[float]] | None] | None = None
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        lp = torch.log_softmax(raw[want], dim=-1)
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=lp.device).unsqueeze(1))
        for row, value in zip(want, chosen.squeeze(1).tolist()):
            logprobs[row] = value
        k = max(params[i].top_logprobs for i in want)
        if k > 0:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            top = [None] * n
            for j, row in enumerate(want):
                keep = params[row].top_logprobs
                if keep:
                    top[row] = (ids[j, :keep].tolist(), values[j, :keep].tolist())
    return Sampled(tokens, logprobs, top)


def _penalized(logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int],
               contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """A copy of `logits` with each row's repetition, frequency and presence penalties applied."""
    out = logits.clone()
    for i, p in enumerate(params):
        if not p.penalized:
            continue
        row, context = out[i], contexts[i]
        if p.repetition_penalty != 1.0 and context:
            seen = torch.tensor(sorted(set(context)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        generated = context[len(context) - num_generated[i]:] if num_generated[i] else ()
        if generated and (p.frequency_penalty or p.presence_penalty):
            tokens, counts = torch.unique(torch.tensor(list(generated), device=row.device), return_counts=True)
            row[tokens] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    return out


def _bias(logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int],
          contexts: Sequence[Sequence[int]]) -> None:
    """In place: each row's logit_bias added; with allowed_token_ids every other token out, and
    the bad words' last tokens out where the output so far ends with the rest of the word (vLLM's
    rule: only the output counts, not the prompt)."""
    for i, p in enumerate(params):
        for words in p.bad_words_token_ids:
            head = len(words) - 1
            if not head or (head <= num_generated[i] and tuple(contexts[i][-head:]) == words[:-1]):
                logits[i, words[-1]] = float("-inf")
        if p.allowed_token_ids:
            allowed = list(p.allowed_token_ids)
            kept = logits[i, allowed]
            logits[i].fill_(float("-inf"))
            logits[i, allowed] = kept
        if p.logit_bias_ids:
            logits[i, list(p.logit_bias_ids)] += torch.tensor(p.logit_bias_values, dtype=logits.dtype,
                                                              device=logits.device)


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = row / p.temperature
    if 0 < p.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.min_p > 0.0:  # (vLLM's order: after top-k and top-p)
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def _stream_seed(seed: int, index: int) -> int:
    # splitmix-style mix so (seed, i) and (seed, i + 1) give unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z ^= z >> 31
    return z & _MASK63
