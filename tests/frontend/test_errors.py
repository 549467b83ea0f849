"""Malformed requests: the right status, an OpenAI error body naming the field, and the server keeps serving."""

from __future__ import annotations

import json

import aiohttp
import asyncio
import pytest
from frontend_harness import MODEL, Harness, make_recipe

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CASES = [
    # (path, raw body or dict, status, param)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {"model": MODEL}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"model": "gpt-9", "messages": MSGS}, 404, "model"),
    (CHAT, {"messages": MSGS}, 400, "model"),
    (CHAT, {"model": MODEL, "messages": MSGS, "n": 17}, 400, "n"),
    (CHAT, {"model": MODEL, "messages": MSGS, "n": 0}, 400, "n"),
    (COMP, {"model": MODEL, "prompt": "a", "best_of": 2}, 400, "best_of"),
    (CHAT, {"model": MODEL, "messages": MSGS, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"model": MODEL, "messages": MSGS, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": MODEL, "messages": MSGS, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": MODEL, "messages": MSGS, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"model": MODEL, "messages": MSGS, "stream": "yes"}, 400, "stream"),
    (CHAT, {"model": MODEL, "messages": MSGS, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"model": MODEL, "messages": MSGS, "stop": [1, 2]}, 400, "stop"),
    (CHAT, {"model": MODEL, "messages": MSGS, "stop": [""]}, 400, "stop"),
    (CHAT, {"model": MODEL, "messages": MSGS, "seed": 1.5}, 400, "seed"),
    (CHAT, {"model": MODEL, "messages": MSGS, "logprobs": "yes"}, 400, "logprobs"),
    (CHAT, {"model": MODEL, "messages": MSGS, "top_logprobs": 3}, 400, "top_logprobs"),  # without logprobs
    (CHAT, {"model": MODEL, "messages": MSGS, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"model": MODEL, "messages": MSGS, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    (CHAT, {"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools[0].function.name"),
    (CHAT, {"model": MODEL, "messages": MSGS, "tools": [TOOL]}, 400, "tools"),  # this recipe parses no calls
    (CHAT, {"model": MODEL, "messages": MSGS, "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    (CHAT, {"model": MODEL, "messages": MSGS, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                               "function": {"name": "nope"}}},
     400, "tool_choice.function.name"),
    (CHAT, {"model": MODEL, "messages": MSGS, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "use_beam_search": True, "stream": True}, 400, "stream"),
    (CHAT, {"model": MODEL, "messages": MSGS, "add_special_tokens": True}, 400, "add_special_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "continue_final_message": True}, 400, "continue_final_message"),
    (CHAT, {"model": MODEL, "messages": [*MSGS, {"role": "assistant", "content": "a"}], "continue_final_message": True,
            "add_generation_prompt": True}, 400, "continue_final_message"),
    (COMP, {"model": MODEL, "prompt": "a", "guided_choice": []}, 400, "guided_choice"),
    (COMP, {"model": MODEL, "prompt": "a", "guided_choice": ["a", ""]}, 400, "guided_choice"),
    (COMP, {"model": MODEL, "prompt": "a", "guided_regex": "a+", "guided_json": {}}, 400, "guided_regex"),
    (CHAT, {"model": MODEL, "messages": MSGS, "include_stop_str_in_output": 1}, 400, "include_stop_str_in_output"),
    (CHAT, {"model": MODEL, "messages": MSGS, "guided_json": "{oops"}, 400, "guided_json"),
    (CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {"xml": "a+"}}, 400, "structured_outputs"),
    (CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {"regex": " "}}, 400, "structured_outputs.regex"),
    (CHAT, {"model": MODEL, "messages": MSGS, "structured_outputs": {"json_object": 1}}, 400,
     "structured_outputs.json_object"),
    (CHAT, {"model": MODEL, "messages": MSGS, "guided_grammar": 5}, 400, "guided_grammar"),
    (CHAT, {"model": MODEL, "messages": MSGS, "min_tokens": -1}, 400, "min_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "min_tokens": 2**70}, 400, "min_tokens"),  # (was a 500)
    (CHAT, {"model": MODEL, "messages": MSGS, "min_tokens": 2, "response_format": {"type": "json_object"}}, 400,
     "min_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    (CHAT, {"model": MODEL, "messages": MSGS, "functions": [TOOL["function"]]}, 400, "functions"),
    (CHAT, {"model": MODEL, "messages": [*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    (CHAT, {"model": MODEL, "messages": MSGS, "presence_penalty": 2.5}, 400, "presence_penalty"),
    (CHAT, {"model": MODEL, "messages": MSGS, "frequency_penalty": "lots"}, 400, "frequency_penalty"),
    (CHAT, {"model": MODEL, "messages": MSGS, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"model": MODEL, "messages": MSGS, "logit_bias": {"five": 10}}, 400, "logit_bias"),
    (CHAT, {"model": MODEL, "messages": MSGS, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (CHAT, {"model": MODEL, "messages": MSGS, "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    (CHAT, {"model": MODEL, "messages": MSGS, "logit_bias": [5, 10]}, 400, "logit_bias"),
    (CHAT, {"model": MODEL, "messages": MSGS, "allowed_token_ids": []}, 400, "allowed_token_ids"),
    (CHAT, {"model": MODEL, "messages": MSGS, "allowed_token_ids": ["a"]}, 400, "allowed_token_ids"),
    (CHAT, {"model": MODEL, "messages": MSGS, "skip_special_tokens": "no"}, 400, "skip_special_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "spaces_between_special_tokens": 0}, 400,
     "spaces_between_special_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "bad_words": "bad"}, 400, "bad_words"),
    (CHAT, {"model": MODEL, "messages": MSGS, "bad_words": ["ok", " "]}, 400, "bad_words"),
    (CHAT, {"model": MODEL, "messages": MSGS, "bad_words": ["w"] * 129}, 400, "bad_words"),
    (CHAT, {"model": MODEL, "messages": MSGS, "dyn": []}, 400, "dyn"),
    (CHAT, {"model": MODEL, "messages": MSGS, "dyn": {"priority": "high"}}, 400, "dyn.priority"),
    (CHAT, {"model": MODEL, "messages": MSGS, "dyn": {"expected_output_tokens": -5}}, 400,
     "dyn.expected_output_tokens"),
    (CHAT, {"model": MODEL, "messages": MSGS, "ignore_eos": 1}, 400, "ignore_eos"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 500}, 400, "max_tokens"),
    (COMP, {"model": MODEL}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": ""}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": [1, -2]}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": {"text": "a"}}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
    (COMP, {"model": MODEL, "prompt": "a", "echo": "yes"}, 400, "echo"),
    (COMP, {"model": MODEL, "prompt": [7] * 600}, 400, "prompt"),
    (COMP, {"model": MODEL, "prompt": [7] * 8, "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    (COMP, {"model": MODEL, "prompt": [7] * 8, "truncate_prompt_tokens": 600}, 400, "truncate_prompt_tokens"),
    (COMP, {"model": MODEL, "prompt": "y" * 20000}, 400, "prompt"),  # tokenized off the event loop
]


@pytest.fixture(scope="module")
def server():
    with Harness(make_recipe(max_context=512), [("w0", "both")]) as h:
        yield h


async def _post(url: str, body, *, method: str = "POST") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


@pytest.mark.parametrize("path,body,status,param", CASES)
def test_malformed_request(server, path, body, status, param):
    url = f"http://127.0.0.1:{server.port}{path}"
    got, payload, _ = asyncio.run(_post(url, body))
    assert got == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_truncate_prompt_tokens_keeps_the_prompts_tail(server):
    """vLLM's truncate_prompt_tokens: the worker gets the prompt's last k tokens (-1: as many as the
    context allows), where a longer prompt would be a 400."""
    url = f"http://127.0.0.1:{server.port}{COMP}"
    prompt = list(range(100, 700))
    for keep, expect in ((3, prompt[-3:]), (-1, prompt[-511:])):
        got, payload, _ = asyncio.run(_post(url, {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                  "truncate_prompt_tokens": keep}))
        assert got == 200, payload
        assert list(server.workers["w0"].requests[-1].prompt_token_ids) == expect
        assert payload["usage"]["prompt_tokens"] == len(expect)


def test_still_serving_after_errors(server):
    url = f"http://127.0.0.1:{server.port}{COMP}"
    status, payload, _ = asyncio.run(_post(url, {"model": MODEL, "prompt": "ok", "max_tokens": 3}))
    assert status == 200 and payload["usage"]["completion_tokens"] == 3


def test_unknown_fields_are_ignored(server):
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 2, "user": "u1", "frobnicate": {"a": 1},
            "metadata": {}, "dyn": {"priority": 3, "session_id": "s", "latency_sensitive": True},
            "ignore_eos": True}
    status, payload, _ = asyncio.run(_post(url, body))
    assert status == 200 and payload["usage"]["completion_tokens"] == 2


def test_unknown_route_and_method(server):
    status, payload, _ = asyncio.run(_post(f"http://127.0.0.1:{server.port}/v1/embeddings", {}))
    assert status == 404 and payload["error"]["code"] == "not_found"
    status, payload, _ = asyncio.run(_post(f"http://127.0.0.1:{server.port}{CHAT}", b"", method="GET"))
    assert status == 405 and payload["error"]["message"]


def test_openapi_document_is_served(server):
    async def get() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.port}/openapi.json") as r:
                return r.status, await r.json()

    status, doc = asyncio.run(get())
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(doc["paths"])
