"""n > 1: several choices of one prompt, each generated as a request of its own, returned together
(non-streamed) or interleaved by index (streamed), with one usage."""

from __future__ import annotations

import json

import openai
import pytest
from frontend_fakes import greedy
from frontend_harness import MODEL, Harness, make_recipe

from dyn.frontend.text import ByteTokenizer


@pytest.fixture(scope="module")
def server():
    with Harness(make_recipe(), [("w0", "both"), ("w1", "both")]) as h:
        yield h


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def _sent(server, rid: str) -> dict[str, object]:
    """Wire request id -> the GenerateRequest the workers got for the client's request `rid`."""
    return {r.request_id: r for w in server.workers.values() for r in w.requests
            if r.request_id.startswith(rid + "/")}


def test_choices_come_back_by_index_with_one_usage(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], n=3, max_tokens=5, temperature=0)
    reply = raw.parse()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1  # greedy: the same answer thrice
    assert all(c.finish_reason == "length" for c in reply.choices)
    prompt = server.frontend.tokenizer.chat_prompt([{"role": "user", "content": "count"}])
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 15
    rid = raw.headers["x-request-id"]
    assert sorted(_sent(server, rid)) == [f"{rid}/0", f"{rid}/1", f"{rid}/2"]


def test_a_seeded_requests_choices_draw_their_own_streams(server, client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="seeded", n=3, max_tokens=3,
                                                      temperature=0.8, seed=41)
    rid = raw.headers["x-request-id"]
    sent = _sent(server, rid)
    assert [sent[f"{rid}/{i}"].sampling.seed for i in range(3)] == [41, 42, 43]
    assert [c.index for c in raw.parse().choices] == [0, 1, 2]


def test_streamed_choices_interleave_by_index_and_end_once(server):
    import urllib.request

    body = {"model": MODEL, "prompt": "stream me", "n": 2, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(server.base_url + "/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    texts: dict[int, str] = {0: "", 1: ""}
    finishes, usage, done = {}, None, 0
    with urllib.request.urlopen(request, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
            usage = chunk.get("usage") or usage
    expected = ByteTokenizer().decode(greedy(list(b"stream me"), 6))
    assert texts == {0: expected, 1: expected} and finishes == {0: "length", 1: "length"}
    assert done == 1 and usage["completion_tokens"] == 12 and usage["prompt_tokens"] == len(b"stream me")
