"""vLLM's beam search (`use_beam_search`), run by the frontend the way vLLM's server runs it.

Each step asks the workers for one token per beam, with the 2 x width likeliest tokens and their
logprobs; every beam's candidates (those and the sampled token) extend it, an EOS candidate ends
it, and the width likeliest continuations (by cumulative logprob) go on. At the end the finished
and the running beams are ranked by cumulative logprob / length ** length_penalty, the length
counting the prompt (vLLM's and transformers' score). A step's requests are ordinary requests
whose prompts share the beam's prefix, so the KV router sends each to the worker that holds it
and a step costs a beam one token of prefill, not its whole context.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

MAX_BEAM_WIDTH = 10
"""A step reads 2 x width likeliest tokens, and the engines give at most 20 (OpenAI's top_logprobs)."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One beam's step: the sampled token and its logprob, and the likeliest tokens with theirs."""

    token: int
    logprob: float
    top_ids: Sequence[int]
    top_logprobs: Sequence[float]

    def candidates(self) -> dict[int, float]:
        """Token -> logprob: the likeliest tokens and the sampled one (vLLM's logprobs map)."""
        return {self.token: self.logprob, **dict(zip(self.top_ids, self.top_logprobs))}


@dataclass(slots=True)
class Beam:
    tokens: list[int] = field(default_factory=list)
    """Generated tokens (an EOS that ended the beam is not among them)."""
    cum_logprob: float = 0.0
    steps: list[StepOutput] = field(default_factory=list)
    """What each of its tokens was chosen from (the answer's logprobs)."""
    logprobs: list[float] = field(default_factory=list)
    """Each token's logprob."""
    finish_reason: str = "length"
    """"stop": an EOS ended it; "length": max_tokens did."""

    def score(self, num_prompt_tokens: int, length_penalty: float) -> float:
        return self.cum_logprob / max(num_prompt_tokens + len(self.tokens), 1) ** length_penalty


Step = Callable[[list[int], int, int], Awaitable[StepOutput]]
"""(the beam's generated tokens, step index, beam index) -> its next step's output."""


async def beam_search(step: Step, num_prompt_tokens: int, width: int, max_tokens: int,
                      eos_token_ids: Sequence[int], *, ignore_eos: bool = False,
                      length_penalty: float = 1.0) -> list[Beam]:
    """The `width` best beams, best first."""
    beams, done = [Beam()], []
    eos = frozenset(() if ignore_eos else eos_token_ids)
    for index in range(max_tokens):
        steps = [asyncio.ensure_future(step(beam.tokens, index, i)) for i, beam in enumerate(beams)]
        try:
            outputs = await asyncio.gather(*steps)
        finally:  # one step failed (or the client left): the others stop too
            for task in steps:
                task.cancel()
        candidates: list[tuple[float, int, Beam, StepOutput, float]] = []
        for beam, out in zip(beams, outputs):
            for token, logprob in out.candidates().items():
                cum = beam.cum_logprob + logprob
                if token in eos:
                    done.append(Beam(beam.tokens, cum, beam.steps, beam.logprobs, "stop"))
                else:
                    candidates.append((cum, token, beam, out, logprob))
        candidates.sort(key=lambda c: -c[0])  # (stable: ties keep beam, then candidate order)
        beams = [Beam(beam.tokens + [token], cum, beam.steps + [out], beam.logprobs + [logprob])
                 for cum, token, beam, out, logprob in candidates[:width]]
        if not beams:
            break
    done += beams
    done.sort(key=lambda beam: -beam.score(num_prompt_tokens, length_penalty))
    return done[:width]
