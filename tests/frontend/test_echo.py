"""Completions' `echo`: the answer starts with the prompt and, with `logprobs`, the prompt's tokens
come scored (the first one null), as lm-eval's loglikelihood tasks read them; streamed, the prompt
is the first chunk. vLLM's `prompt_logprobs` (completions and chat) score the prompt in vLLM's
shape. The fake workers score prompt token i at -i/8 (frontend_fakes.prompt_scores)."""

from __future__ import annotations

import json

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.control.sampling import PromptLogprobs
from dyn.frontend.responses import scored_prompt
from dyn.frontend.text import ByteTokenizer


def test_echo_puts_the_prompt_before_the_answer(client):
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=4).choices[0].text
    assert client.completions.create(model=MODEL, prompt="abc", max_tokens=4, echo=True).choices[0].text == \
        "abc" + plain
    ids = [104, 105]  # token ids: the prompt comes back decoded
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True).choices[0].text.startswith("hi")


def test_echo_with_logprobs_scores_every_prompt_token(client, harness):
    answer = client.completions.create(model=MODEL, prompt="abcd", max_tokens=2, logprobs=2, echo=True)
    lp = answer.choices[0].logprobs
    plain = client.completions.create(model=MODEL, prompt="abcd", max_tokens=2, logprobs=2).choices[0].logprobs
    assert lp.tokens == ["a", "b", "c", "d"] + plain.tokens
    assert lp.token_logprobs == [None, -1 / 8, -2 / 8, -3 / 8] + plain.token_logprobs
    assert lp.top_logprobs[0] is None
    assert lp.top_logprobs[1:4] == [{"b": -1 / 8, "c": -1 / 8 - 1}, {"c": -2 / 8, "d": -2 / 8 - 1},
                                    {"d": -3 / 8, "e": -3 / 8 - 1}]
    assert lp.top_logprobs[4:] == plain.top_logprobs
    assert lp.text_offset == list(range(6))  # one character per token, across prompt and answer
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == 2
    sent = harness.workers["w0"].requests[-2]
    assert sent.sampling.prompt_logprobs == 2
    assert harness.workers["w0"].requests[-1].sampling.prompt_logprobs is None  # only echo asks


def test_streamed_echo_sends_the_prompt_first_then_the_same_answer(client):
    whole = client.completions.create(model=MODEL, prompt="abcd", max_tokens=3, logprobs=1, echo=True).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt="abcd", max_tokens=3, logprobs=1,
                                                               echo=True, stream=True)]
    assert chunks[0].text == "abcd" and chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset
    both = client.completions.create(model=MODEL, prompt="xy", max_tokens=2, n=2, echo=True, stream=True)
    texts = ["", ""]
    for chunk in both:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(text.startswith("xy") and len(text) == 4 for text in texts)


def test_the_prefill_worker_scores_the_prompt_and_decode_is_not_asked_again():
    with Harness(make_recipe("disaggregated", threshold=1), [("p0", "prefill"), ("d0", "decode")]) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        lp = c.completions.create(model=MODEL, prompt="abcdef", max_tokens=3, logprobs=0, echo=True).choices[0].logprobs
        assert lp.token_logprobs[:6] == [None] + [-i / 8 for i in range(1, 6)] and len(lp.tokens) == 9
        assert h.workers["p0"].requests[-1].sampling.prompt_logprobs == 0
        (decode,) = h.workers["d0"].requests
        assert decode.kv_source is not None and decode.sampling.prompt_logprobs is None


def test_an_engine_without_prompt_scores_echoes_the_text_with_null_logprobs():
    """The mock engine gives no prompt scores: the echoed chunk carries the prompt with logprobs null, and
    the answer's offsets count from the end of the prompt's text."""
    from dyn.frontend.responses import Echo, StreamFormatter
    from dyn.frontend.worker_stream import Piece

    tok = ByteTokenizer()
    for scores in (None, PromptLogprobs([-1.0])):  # none, or not one per prompt token after the first
        fmt = StreamFormatter("completion", "cmpl-1", "m", tok, include_usage=False, echo=Echo("abc", [97, 98, 99]))
        frames = fmt.piece(Piece("d", [100], [-0.5], None, None, None, scores)).decode().split("\n\n")
        echoed, first = (json.loads(f[len("data: "):])["choices"][0] for f in frames[:2])
        assert echoed["text"] == "abc" and echoed["logprobs"] is None
        assert first["text"] == "d" and first["logprobs"]["text_offset"] == [3]


def _entry(token: str, logprob: float, rank: int) -> tuple[str, dict]:
    return str(ord(token)), {"logprob": logprob, "rank": rank, "decoded_token": token}


def test_prompt_logprobs_score_the_prompt_as_vllm_answers_it(client, harness):
    """vLLM's prompt_logprobs: null for the first token, then per token a map from token id to
    logprob, rank and text holding the prompt token and the k likeliest (ranked 1..k; the prompt
    token, when it is one of them, keeps its place in the map with the top rank)."""
    answer = client.completions.create(model=MODEL, prompt="abcd", max_tokens=2, extra_body={"prompt_logprobs": 2})
    scored = answer.choices[0].prompt_logprobs
    assert scored == [None, dict([_entry("b", -1 / 8, 1), _entry("c", -1 / 8 - 1, 2)]),
                      dict([_entry("c", -2 / 8, 1), _entry("d", -2 / 8 - 1, 2)]),
                      dict([_entry("d", -3 / 8, 1), _entry("e", -3 / 8 - 1, 2)])]
    assert answer.choices[0].logprobs is None and harness.workers["w0"].requests[-1].sampling.prompt_logprobs == 2
    alone = client.completions.create(model=MODEL, prompt="abcd", max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert alone.choices[0].prompt_logprobs == [None, dict([_entry("b", -1 / 8, 1)]), dict([_entry("c", -2 / 8, 2)]),
                                                dict([_entry("d", -3 / 8, 3)])]  # the engine's ranks
    # With echo + logprobs 1 the engine scores the prompt once, for the larger k; echo shows 1.
    both = client.completions.create(model=MODEL, prompt="abc", max_tokens=1, logprobs=1, echo=True,
                                     extra_body={"prompt_logprobs": 3}).choices[0]
    assert harness.workers["w0"].requests[-1].sampling.prompt_logprobs == 3
    assert both.logprobs.top_logprobs[1:3] == [{"b": -1 / 8}, {"c": -2 / 8}] and len(both.prompt_logprobs[1]) == 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          n=2, extra_body={"prompt_logprobs": 0})
    top = chat.model_extra["prompt_logprobs"]  # once, beside the choices (as vLLM's chat answer has it)
    assert top[0] is None and len(top) == chat.usage.prompt_tokens and all(len(entry) == 1 for entry in top[1:])
    assert all("prompt_logprobs" not in choice.model_extra for choice in chat.choices)
    plain = client.completions.create(model=MODEL, prompt="abcd", max_tokens=1)
    assert "prompt_logprobs" not in plain.choices[0].model_extra


def test_prompt_logprobs_are_refused_where_vllm_refuses_them(client, harness):
    """A stream carries no prompt scores (vLLM's rule: k > 0 is a 400, 0 asks for nothing), and -1 (the
    whole vocabulary) is beyond the top-k limit."""
    for body, stream in (({"prompt_logprobs": 1}, True), ({"prompt_logprobs": -1}, False),
                         ({"prompt_logprobs": "2"}, False)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="ab", max_tokens=1, stream=stream, extra_body=body)
        assert refused.value.body["param"] == "prompt_logprobs"
    chunks = list(client.completions.create(model=MODEL, prompt="ab", max_tokens=2, stream=True,
                                            extra_body={"prompt_logprobs": 0}))
    assert "".join(c.choices[0].text for c in chunks) and \
        harness.workers["w0"].requests[-1].sampling.prompt_logprobs is None


def test_prompt_scores_without_an_engine_answer_or_with_minus_infinity():
    """An engine without prompt scores (the mock) answers null; -inf is written as vLLM writes it."""
    tok = ByteTokenizer()
    assert scored_prompt(tok, [97, 98], None, 2) is None
    assert scored_prompt(tok, [97, 98], PromptLogprobs([float("-inf")], None, None, [7]), 0) == \
        [None, {"98": {"logprob": -9999.0, "rank": 7, "decoded_token": "b"}}]


def test_choices_of_one_request_score_the_prompt_once(client, harness):
    """n > 1, whole or streamed: the first choice asks the engine for the prompt's scores, the others
    take them (so they may run on the cached prompt instead of prefilling it whole again)."""
    worker = harness.workers["w0"]
    one = client.completions.create(model=MODEL, prompt="abcd", max_tokens=2, extra_body={"prompt_logprobs": 1})
    before = len(worker.requests)
    three = client.completions.create(model=MODEL, prompt="abcd", max_tokens=2, n=3,
                                      extra_body={"prompt_logprobs": 1})
    asked = [r.sampling.prompt_logprobs for r in worker.requests[before:]]
    assert sorted(asked, key=lambda k: k is None) == [1, None, None]
    assert [c.prompt_logprobs for c in three.choices] == [one.choices[0].prompt_logprobs] * 3
    echoed = client.completions.create(model=MODEL, prompt="abc", max_tokens=1, n=2, logprobs=0, echo=True)
    heads = [c.logprobs.token_logprobs[:3] for c in echoed.choices]
    assert heads == [[None, -1 / 8, -2 / 8]] * 2
    assert sum(r.sampling.prompt_logprobs is not None for r in worker.requests[-2:]) == 1
    # Streamed: the other choices' first chunks (the echoed prompt) wait for the first choice's scores.
    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, n=3, logprobs=0, echo=True,
                                         stream=True)
    heads = {}
    for chunk in streamed:
        for choice in chunk.choices:
            if choice.index not in heads and choice.logprobs is not None:
                heads[choice.index] = (choice.text, choice.logprobs.token_logprobs)
    assert heads == {i: ("abc", [None, -1 / 8, -2 / 8]) for i in range(3)}
    assert sum(r.sampling.prompt_logprobs is not None for r in worker.requests[-3:]) == 1
