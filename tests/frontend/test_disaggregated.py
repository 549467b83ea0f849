"""Disaggregated flow: remote prefill + KV offer + decode, local prefill for short prompts, fallback."""

from __future__ import annotations

import openai
import pytest
from frontend_fakes import greedy
from frontend_harness import MODEL, Harness, make_recipe

from dyn.frontend.text import ByteTokenizer

LONG = "a prompt that is clearly longer than sixteen tokens"
SHORT = "short"


def _complete(h: Harness, prompt: str, n: int, stream: bool) -> tuple[str, str]:
    with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        if stream:
            chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True))
            return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n)
        return out.choices[0].text, out.choices[0].finish_reason


def _expected(prompt: str, n: int) -> str:
    return ByteTokenizer().decode(greedy(list(prompt.encode()), n))


def test_a_one_token_request_ends_on_the_prefill_worker_without_a_kv_offer():
    """max_tokens 1 (lm-eval's scoring, a beam search step): the prefill worker's token is the
    answer, so it runs there as a plain request, exporting nothing nobody would pull."""
    with Harness(make_recipe("disaggregated", threshold=16), [("p0", "prefill"), ("d0", "decode")]) as h:
        assert _complete(h, LONG, 1, False) == (_expected(LONG, 1), "length")
        (prefilled,) = h.workers["p0"].requests
        assert not prefilled.prefill_only and prefilled.sampling.max_tokens == 1
        assert h.workers["d0"].requests == [] and h.workers["p0"].kv_store == {}


@pytest.mark.parametrize("stream", [False, True])
def test_long_prompt_prefills_remotely_and_matches_aggregated(stream):
    with Harness(make_recipe("disaggregated", threshold=16), [("p0", "prefill"), ("d0", "decode")]) as h:
        text, reason = _complete(h, LONG, 12, stream)
        prefill, decode = h.workers["p0"], h.workers["d0"]
        assert [r.prefill_only for r in prefill.requests] == [True]
        assert len(decode.requests) == 1
        handoff = decode.requests[0]
        assert handoff.kv_source == {"worker": "p0", "request_id": prefill.requests[0].request_id,
                                     "num_tokens": len(LONG)}
        assert handoff.first_token == ord(text[0])
        assert handoff.prompt_token_ids == list(LONG.encode())
        # a client that reads only the whole answer lets the decode worker hold its tokens back
        assert (prefill.requests[0].hold_s, handoff.hold_s) == (0.0, 0.0 if stream else 0.5)
    with Harness(make_recipe("aggregated"), [("w0", "both")]) as agg:
        agg_text, agg_reason = _complete(agg, LONG, 12, stream)
    assert text == agg_text == _expected(LONG, 12)
    assert reason == agg_reason == "length"


def test_short_prompt_prefills_on_the_decode_worker():
    with Harness(make_recipe("disaggregated", threshold=16), [("p0", "prefill"), ("d0", "decode")]) as h:
        text, _ = _complete(h, SHORT, 5, False)
        assert text == _expected(SHORT, 5)
        assert h.workers["p0"].requests == []
        assert h.workers["d0"].requests[0].kv_source is None


def test_failed_prefill_falls_back_to_the_decode_worker():
    with Harness(make_recipe("disaggregated", threshold=16), [("p0", "prefill"), ("d0", "decode")],
                 fail_prefill=True) as h:
        text, _ = _complete(h, LONG, 9, True)
        assert text == _expected(LONG, 9)
        assert len(h.workers["p0"].requests) == 1
        plain = h.workers["d0"].requests[0]
        assert plain.kv_source is None and plain.prompt_token_ids == list(LONG.encode())
        metrics = h.frontend.metrics.render().decode()
        assert 'dyn_frontend_prefill_total{path="fallback"} 1.0' in metrics


def test_one_token_request_needs_no_decode_worker():
    with Harness(make_recipe("disaggregated", threshold=16), [("p0", "prefill"), ("d0", "decode")]) as h:
        text, reason = _complete(h, LONG, 1, False)
        assert text == _expected(LONG, 1) and reason == "length"
        assert h.workers["d0"].requests == []


def test_only_a_client_reading_the_whole_answer_lets_the_worker_hold_tokens():
    """hold_s: non-streaming without stop strings (those are matched here as the text grows);
    a streaming client sees every step."""
    with Harness(make_recipe("aggregated"), [("w0", "both")], stall_timeout_s=1.0) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
            whole = c.completions.create(model=MODEL, prompt=SHORT, max_tokens=6).choices[0].text
            c.completions.create(model=MODEL, prompt=SHORT, max_tokens=6, stop=["zz"])
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt=SHORT, max_tokens=6, stream=True))
        assert [r.hold_s for r in h.workers["w0"].requests] == [0.25, 0.0, 0.0]  # stall_timeout_s / 4
        assert whole == streamed == _expected(SHORT, 6)
