"""top_logprobs (chat) and logprobs=k (completions): each token's likeliest alternatives travel from
the engine through the worker's chunks to OpenAI's objects, streamed or not."""

from __future__ import annotations

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.engine.backend import TokenOutput
from dyn.worker.request_server import _merge_outputs


@pytest.fixture(scope="module")
def client():
    with Harness(make_recipe(), [("w0", "both")]) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def _letters(token_text: str, k: int) -> list[str]:
    first = ord(token_text) - 97
    return [chr(97 + (first + j) % 26) for j in range(k)]


def test_chat_top_logprobs_name_each_alternative(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert [alt.token for alt in entry.top_logprobs] == _letters(entry.token, 3)
        assert [alt.logprob for alt in entry.top_logprobs] == [-0.25, -1.25, -2.25]
        assert entry.top_logprobs[0].bytes == list(entry.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all([a.token for a in e.top_logprobs] == _letters(e.token, 2) for e in streamed)


def test_completion_logprobs_k_maps_the_k_likeliest(client):
    reply = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == 3
    assert [list(alts) for alts in lp.top_logprobs] == [_letters(t, 2) for t in lp.tokens]
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=0).choices[0].logprobs
    assert [list(alts) for alts in plain.top_logprobs] == [[t] for t in plain.tokens]  # the sampled token


def test_worker_joins_outputs_with_their_alternatives_in_order():
    steps = [TokenOutput("a", [1], logprobs=[-0.1], top_ids=[[1, 2]], top_logprobs=[[-0.1, -2.0]]),
             TokenOutput("a", [3], True, "length", logprobs=[-0.3], top_ids=[[3, 4]], top_logprobs=[[-0.3, -1.0]])]
    (merged,) = _merge_outputs(steps + [TokenOutput("b", [9])])[:1]
    assert merged.token_ids == [1, 3] and merged.top_ids == [[1, 2], [3, 4]]
    assert merged.top_logprobs == [[-0.1, -2.0], [-0.3, -1.0]] and merged.finished
    assert steps[0].top_ids == [[1, 2]]  # inputs untouched
