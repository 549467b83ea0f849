"""vLLM's beam search as the frontend runs it (dyn.frontend.beam_search): over a table model, whose
next-token distributions are given so the best beams can be worked out by hand, then through the
HTTP API over fake workers."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import openai
import pytest
from frontend_harness import MODEL

from dyn.frontend.beam_search import StepOutput, beam_search

EOS = 0
A, B, X, Y, Z = 1, 2, 3, 4, 5


def _table_step(table: dict[tuple[int, ...], dict[int, float]], asked: list | None = None):
    async def step(tokens: list[int], index: int, beam: int) -> StepOutput:
        if asked is not None:
            asked.append((tuple(tokens), index, beam))
        probs = table[tuple(tokens)]
        ranked = sorted(probs, key=lambda t: -probs[t])
        return StepOutput(ranked[0], math.log(probs[ranked[0]]), ranked, [math.log(probs[t]) for t in ranked])
    return step


def test_beams_find_the_likelier_answer_greedy_decoding_misses():
    table = {(): {A: 0.6, B: 0.4}, (A,): {X: 0.34, Y: 0.33, Z: 0.33}, (B,): {X: 0.9, Y: 0.1}}
    asked: list = []
    greedy = asyncio.run(beam_search(_table_step(table), 1, 1, 2, [EOS]))
    assert [b.tokens for b in greedy] == [[A, X]]
    best = asyncio.run(beam_search(_table_step(table, asked), 1, 2, 2, [EOS]))
    assert [b.tokens for b in best] == [[B, X], [A, X]]
    assert best[0].cum_logprob == pytest.approx(math.log(0.4 * 0.9))
    assert best[0].logprobs == pytest.approx([math.log(0.4), math.log(0.9)])
    assert best[0].finish_reason == best[1].finish_reason == "length"
    assert sorted(asked) == [((), 0, 0), ((A,), 1, 0), ((B,), 1, 1)]  # one request per beam per step


def test_an_eos_ends_a_beam_and_the_length_penalty_ranks_ended_against_longer_beams():
    table = {(): {EOS: 0.5, A: 0.5}, (A,): {B: 0.9, EOS: 0.1}}
    # score = cumulative logprob / (prompt + generated tokens) ** length_penalty; prompt of 1 token
    long_first = asyncio.run(beam_search(_table_step(table), 1, 2, 2, [EOS], length_penalty=1.0))
    assert [(b.tokens, b.finish_reason) for b in long_first] == [([A, B], "length"), ([], "stop")]
    short_first = asyncio.run(beam_search(_table_step(table), 1, 2, 2, [EOS], length_penalty=0.0))
    assert [(b.tokens, b.finish_reason) for b in short_first] == [([], "stop"), ([A, B], "length")]
    assert short_first[0].cum_logprob == pytest.approx(math.log(0.5))
    # with ignore_eos an EOS is a token like any other
    table[(EOS,)] = {A: 1.0}
    ignored = asyncio.run(beam_search(_table_step(table), 1, 2, 2, [EOS], ignore_eos=True, length_penalty=0.0))
    assert [b.tokens for b in ignored] == [[EOS, A], [A, B]]


def test_the_sampled_token_is_a_candidate_beside_the_likeliest():
    """A sampled (temperature > 0) token outside the likeliest still extends its beam, as in vLLM."""
    async def step(tokens: list[int], index: int, beam: int) -> StepOutput:
        return StepOutput(Z, math.log(0.05), [A, B], [math.log(0.5), math.log(0.45)])
    best = asyncio.run(beam_search(step, 1, 3, 1, [EOS]))
    assert [b.tokens for b in best] == [[A], [B], [Z]]


def test_a_failed_step_stops_the_other_beams_steps():
    table = {(): {A: 0.6, B: 0.4}}
    cancelled = []

    async def step(tokens: list[int], index: int, beam: int) -> StepOutput:
        if index == 0:
            return await _table_step(table)(tokens, index, beam)
        if beam == 0:
            raise RuntimeError("worker failed")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(beam)
            raise
        raise AssertionError("not cancelled")

    with pytest.raises(RuntimeError, match="worker failed"):
        asyncio.run(beam_search(step, 1, 2, 3, [EOS]))
    assert cancelled == [1]


def test_use_beam_search_answers_the_best_beams_as_choices(client, harness):
    """Over the fake workers (each step's likeliest token scores -0.25, the next ones -1.25, -2.25,
    ...): the best beam is the greedy answer, the others differ, and each step asked the workers
    for one token per beam with 2 x width likeliest tokens."""
    worker = harness.workers["w0"]
    greedy = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0).choices[0].text
    before, ttft = len(worker.requests), _samples(harness, "dyn_frontend_ttft_seconds_count")
    answer = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, n=3, logprobs=1,
                                       extra_body={"use_beam_search": True, "length_penalty": 0.5})
    texts = [c.text for c in answer.choices]
    assert texts[0] == greedy and len(set(texts)) == 3 and all(len(t) == 4 for t in texts)
    assert answer.choices[0].logprobs.token_logprobs == [-0.25] * 4
    assert all(c.finish_reason == "length" and c.index == i for i, c in enumerate(answer.choices))
    assert answer.usage.prompt_tokens == 3 and answer.usage.completion_tokens == 12
    steps = worker.requests[before:]
    assert len(steps) == 1 + 3 * 3  # one beam at the first step, then three
    assert all(r.sampling.max_tokens == 1 and r.sampling.top_logprobs == 6 and r.sampling.ignore_eos for r in steps)
    assert sorted(len(r.prompt_token_ids) for r in steps) == [3] + [4] * 3 + [5] * 3 + [6] * 3
    assert _samples(harness, "dyn_frontend_ttft_seconds_count") == ttft  # a step's first token is no client's
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          n=2, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content


def _samples(harness, name: str) -> float:
    with urllib.request.urlopen(harness.base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        return next(float(line.split()[-1]) for line in r.read().decode().splitlines() if line.startswith(name))


@pytest.mark.parametrize("body, param", [
    ({"stream": True}, "stream"),
    ({"n": 11}, "n"),
    ({"stop": ["x"]}, "stop"),
    ({"min_tokens": 1}, "min_tokens"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"echo": True}, "echo"),
    ({"guided_regex": "[a-z]+"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"length_penalty": "long"}, "length_penalty"),
])
def test_beam_search_refuses_what_it_would_ignore(client, body, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="abc", max_tokens=2, extra_body={"use_beam_search": True, **body})
    assert refused.value.body["param"] == param


def test_length_penalty_without_beam_search_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="abc", max_tokens=2, extra_body={"length_penalty": 2.0})
    assert refused.value.body["param"] == "length_penalty"
