"""model.reasoning_parser: a thinking model's chat answer comes back as reasoning_content and
content, streamed or not, however the text is cut into pieces."""

from __future__ import annotations

from dataclasses import replace

import openai
import pytest
import zmq.asyncio
from frontend_harness import MODEL, Harness, make_recipe

from dyn.config.loader import parse_recipe
from dyn.control.sockets import Security
from dyn.errors import ConfigError
from dyn.frontend.process import build_frontend, worker_limits
from dyn.frontend.reasoning import END, ReasoningSplitter
from dyn.frontend.text import ByteTokenizer
from dyn.frontend.workers import WorkerPool

ANSWER = "<think>\nadd 2 and 2, that is 4</think>\n\nIt is 4."


def _split_in(pieces: list[str], **kwargs) -> tuple[str, str]:
    splitter = ReasoningSplitter(**kwargs)
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        split = splitter.feed(piece, final=i == len(pieces) - 1)
        reasoning += split.reasoning
        content += split.content
    return reasoning, content


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 100])
def test_any_cut_of_the_text_gives_the_same_split(size):
    pieces = [ANSWER[i:i + size] for i in range(0, len(ANSWER), size)] + [""]
    assert _split_in(pieces) == ("\nadd 2 and 2, that is 4", "\n\nIt is 4.")


def test_template_opened_think_unclosed_reasoning_and_thinking_off():
    assert _split_in(["Let me see", "</think>Paris"]) == ("Let me see", "Paris")  # the template wrote <think>
    assert _split_in(["still thinking <", "/thi", ""]) == ("still thinking </thi", "")  # never closed
    assert _split_in([ANSWER, ""], thinking=False) == ("", ANSWER)  # qwen3, enable_thinking false


@pytest.fixture
def think_token(monkeypatch):
    """The byte tokenizer of mock deployments has no </think> token; these tests give it one."""
    monkeypatch.setattr(ByteTokenizer, "token_id", lambda self, text: 1 if text == END else None)


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_chat_answers_carry_reasoning_content_apart(think_token, parser):
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, reasoning_parser=parser))
    messages = [{"role": "user", "content": "2+2?"}]
    with Harness(recipe, [("w0", "both")], reply=ANSWER) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as client:
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64)
        message = whole.choices[0].message.model_dump()
        assert (message["reasoning_content"], message["content"]) == ("\nadd 2 and 2, that is 4", "\n\nIt is 4.")
        reasoning = content = ""
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, stream=True):
            if chunk.choices:
                delta = chunk.choices[0].delta.model_dump()
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
        assert (reasoning, content) == ("\nadd 2 and 2, that is 4", "\n\nIt is 4.")
        completion = client.completions.create(model=MODEL, prompt="2+2?", max_tokens=64)
        assert completion.choices[0].text == ANSWER  # completions are never split
        off = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        expected = ANSWER if parser == "qwen3" else "\n\nIt is 4."
        assert off.choices[0].message.content == expected


def test_a_model_without_the_end_token_is_refused_naming_the_field():
    recipe = parse_recipe("name: t\nmodel:\n  engine: mock\n  reasoning_parser: qwen3\nworkers: {both: {}}\n",
                          "r.yaml")
    ctx = zmq.asyncio.Context()
    try:
        with pytest.raises(ConfigError) as err:
            build_frontend(recipe, WorkerPool(ctx, Security.from_keys(None), worker_limits(recipe)))
    finally:
        ctx.term()
    assert str(err.value).startswith("r.yaml:4: model.reasoning_parser: reasoning_parser qwen3: the model's "
                                     "tokenizer has no '</think>' token")


def test_a_json_answer_is_content_even_with_a_reasoning_parser(think_token):
    """Under response_format the grammar makes the answer JSON from its first token: no reasoning to split."""
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, reasoning_parser="deepseek_r1"))
    with Harness(recipe, [("w0", "both")], reply='{"a": 1}') as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as client:
        message = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=16,
                                                 response_format={"type": "json_object"}).choices[0].message
        assert message.content == '{"a": 1}' and not message.model_dump().get("reasoning_content")
