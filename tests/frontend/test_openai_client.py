"""The official openai client (sync and async, streaming and not) against the frontend."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

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


def _expected(prompt: str, n: int) -> str:
    return ByteTokenizer().decode(greedy(list(prompt.encode()), n))


def test_completion_text_and_usage(client):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=7, temperature=0)
    assert out.choices[0].text == _expected("hello world", 7)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 7, 18)
    assert out.id.startswith("cmpl-")


def test_completion_token_ids_prompt(client):
    ids = [104, 105, 33]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5)
    assert out.choices[0].text == ByteTokenizer().decode(greedy(ids, 5))
    assert out.usage.prompt_tokens == 3


def test_chat_non_streaming(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_completion_tokens=6)
    prompt = ByteTokenizer().chat_prompt([{"role": "user", "content": "hi"}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ByteTokenizer().decode(greedy(prompt, 6))
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == 6


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hey"}],
                                            max_tokens=9, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = ByteTokenizer().chat_prompt([{"role": "user", "content": "hey"}])
    assert text == ByteTokenizer().decode(greedy(prompt, 9))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_stop_string_trims_and_cancels(server, client):
    full = _expected("abc", 40)
    stop = full[10:13]
    cut = full.index(stop)
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=40, stop=[stop])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == cut + len(stop)
    rid = out.id.removeprefix("cmpl-")
    worker = next(w for w in server.workers.values() if any(r.request_id == rid for r in w.requests))
    deadline = time.monotonic() + 3
    while rid not in worker.cancels and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rid in worker.cancels  # the frontend told the worker to stop generating


def test_stop_string_streaming(client):
    full = _expected("xyz", 30)
    stop = full[5:8]
    cut = full.index(stop)
    stream = client.completions.create(model=MODEL, prompt="xyz", max_tokens=30, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model=MODEL, prompt="xyz", max_tokens=30, stop=stop,
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == full[:cut + len(stop)] and kept.choices[0].finish_reason == "stop"


def test_min_tokens_makes_a_stop_string_wait_for_a_later_token(client):
    """vLLM's min_tokens with stop strings (the byte tokenizer: a token a character): a stop string
    that ends within the first min_tokens tokens does not stop the answer; the next one that ends
    after them does."""
    full = _expected("mno", 40)
    stop = full[2]
    later = full.index(stop, 12)  # (the fake model's greedy text has it again after the first 12)
    assert client.completions.create(model=MODEL, prompt="mno", max_tokens=40, stop=[stop]).choices[0].text == full[:2]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="mno", max_tokens=40, stop=[stop], stream=stream,
                                        extra_body={"min_tokens": 12})
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == full[:later]


def test_async_client_concurrent_streams():
    async def main(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as c:
            async def one(i: int) -> str:
                stream = await c.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=8, stream=True)
                return "".join([ch.choices[0].text async for ch in stream])
            return await asyncio.gather(*(one(i) for i in range(16)))

    with Harness(make_recipe(), [("w0", "both"), ("w1", "both")]) as h:
        texts = asyncio.run(main(h.base_url))
        assert texts == [_expected(f"p{i}", 8) for i in range(16)]
        used = {wid for wid, w in h.workers.items() if w.requests}
        assert used == {"w0", "w1"}


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    import urllib.request
    with urllib.request.urlopen(server.base_url.replace("/v1", "/health")) as r:
        assert r.status == 200


def test_a_lora_adapter_is_a_model_of_its_own_with_its_own_kv_blocks(caplog):
    """A request naming a LoRA adapter (recipe model.lora_adapters) reaches the worker with it and
    with a KV salt of its own (the same prompt's blocks differ under the adapter); the answer and
    the request's log line name the adapter and a counter counts it; /v1/models lists it with its
    base; an unknown name's 404 lists both."""
    import logging
    from dataclasses import replace

    caplog.set_level(logging.INFO, logger="dyn.frontend.app")

    base = make_recipe()
    recipe = replace(base, model=replace(base.model, lora_adapters=(("sql-lora", "/adapters/sql"),)))
    with Harness(recipe, [("w0", "both")]) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as client:
        models = client.models.list().data
        assert [(m.id, getattr(m, "parent", None)) for m in models] == [(MODEL, None), ("sql-lora", MODEL)]
        messages = [{"role": "user", "content": "q"}]
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        adapted = client.chat.completions.create(model="sql-lora", messages=messages, max_tokens=2)
        assert (plain.model, adapted.model) == (MODEL, "sql-lora")
        first, second = h.workers["w0"].requests[-2:]
        assert (first.adapter, second.adapter) == (None, "sql-lora")
        assert first.prompt_token_ids == second.prompt_token_ids and first.salt != second.salt
        finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request finished")]
        assert "LoRA adapter" not in finished[-2] and finished[-1].endswith(", LoRA adapter sql-lora")
        with urllib.request.urlopen(h.base_url.replace("/v1", "/metrics")) as r:
            metrics = r.read().decode()
        assert 'dyn_frontend_lora_requests_total{adapter="sql-lora"} 1.0' in metrics
        # the adapter's own latency histograms hold its one request (the base model's are not in them)
        assert 'dyn_frontend_lora_ttft_seconds_count{adapter="sql-lora"} 1.0' in metrics
        assert 'dyn_frontend_lora_request_duration_seconds_count{adapter="sql-lora"} 1.0' in metrics
        with pytest.raises(openai.NotFoundError, match="sql-lora"):
            client.chat.completions.create(model="other", messages=messages, max_tokens=2)


def test_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                         max_tokens=3, logprobs=True)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == [-0.25] * 3
    assert "".join(c.token for c in content) == out.choices[0].message.content


# n > 1: several choices of one prompt, each generated as a request of its own, returned together
# (non-streamed) or interleaved by index (streamed), with one usage.

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
