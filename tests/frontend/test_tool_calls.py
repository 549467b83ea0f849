"""Tool calling: a chat request's `tools` reach the chat template, and the calls the model writes
(Hermes `<tool_call>` blocks, Llama 3.1's bare JSON) come back as OpenAI `tool_calls`, whole or
streamed, as vLLM's parsers of the same names return them; what does not parse stays content."""

from __future__ import annotations

import json
from dataclasses import replace

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.engine.chat_template import compile_chat_template
from dyn.frontend.protocol import parse_chat
from dyn.frontend.tool_calls import AnswerSplitter, ForcedCalls, ToolCallSplitter, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
HERMES_REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>')


def _calls(parser: str, text: str) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = parse_tool_calls(parser, text)  # type: ignore[arg-type]
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_blocks_become_calls_and_anything_unparsed_stays_content():
    assert _calls("hermes", HERMES_REPLY) == ("Let me check.\n", [("get_weather", {"city": "Paris"}),
                                                                ("get_weather", {"city": "Zürich"})])
    cut = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"x": 1}}'
    assert _calls("hermes", cut) == ("", [("f", {}), ("g", {"x": 1})])  # the last closing tag cut off
    for text in ('<tool_call>{"name": "f", "arguments": {oops}</tool_call>',  # not JSON
                 '<tool_call>{"arguments": {}}</tool_call>',  # no name
                 '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then more words',
                 "no call at all"):
        assert _calls("hermes", text) == (text, [])


def test_llama3_json_calls_are_the_whole_answer():
    assert _calls("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}') == \
        ("", [("get_weather", {"city": "Paris"})])
    assert _calls("llama3_json", ' {"name": "a", "arguments": "{\\"x\\": 2}"}; {"name": "b", "parameters": {}}') == \
        ("", [("a", {"x": 2}), ("b", {})])
    for text in ('The answer is {"name": "f"}', '{"name": "f", "parameters": {}} trailing', '{"no": "name"}'):
        assert _calls("llama3_json", text) == (text, [])


@pytest.mark.parametrize("parser,text", [("hermes", HERMES_REPLY), ("hermes", "plain <tool_ answer, no call"),
                                         ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2]}}'),
                                         ("llama3_json", "A plain answer {with braces}.")])
def test_streamed_pieces_split_as_the_whole_answer(parser, text):
    for size in (1, 3, 7):
        splitter = ToolCallSplitter(parser)  # type: ignore[arg-type]
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        sent = [splitter.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        content, calls = parse_tool_calls(parser, text)  # type: ignore[arg-type]
        assert "".join(sent) == content
        assert [(c.name, c.arguments) for c in splitter.calls] == [(c.name, c.arguments) for c in calls]
    if parser == "hermes" and calls:  # content before a call is not held to the end
        splitter = ToolCallSplitter("hermes")
        assert splitter.feed("Let me check.\n") == "Let me check.\n"


def _streamed(parser: str, text: str, size: int, single_call: bool = False) -> tuple[str, dict[int, list[dict]], list]:
    """Feed `text` in pieces of `size` characters: the content sent, each call's deltas, the final calls."""
    splitter = AnswerSplitter(None, ToolCallSplitter(parser), single_call=single_call)  # type: ignore[arg-type]
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    content, deltas = "", {}
    for i, piece in enumerate(pieces):
        split = splitter.feed(piece, final=i == len(pieces) - 1)
        content += split.content
        for delta in split.call_deltas or ():
            deltas.setdefault(delta["index"], []).append(delta)
    return content, deltas, split.tool_calls


@pytest.mark.parametrize("parser,text", [
    ("hermes", HERMES_REPLY),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": [1, {"y": "}\\\\"}]}};  {"name": "b", "parameters": {}}'),
])
def test_calls_stream_name_first_then_arguments_as_written(parser, text):
    whole_content, whole_calls = parse_tool_calls(parser, text)  # type: ignore[arg-type]
    for size in (1, 2, 5, 13, len(text)):
        content, deltas, calls = _streamed(parser, text, size)
        assert content == whole_content and [c.name for c in calls] == [c.name for c in whole_calls]
        assert sorted(deltas) == list(range(len(whole_calls)))
        for index, parts in deltas.items():  # (one delta per call in a chunk: its pieces joined)
            head, rest = parts[0], parts[1:]
            assert {k: head[k] for k in ("index", "id", "type")} == {"index": index, "id": calls[index].id,
                                                                   "type": "function"}
            assert head["function"]["name"] == whole_calls[index].name
            assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
            assert json.loads("".join(p["function"]["arguments"] for p in parts)) == \
                json.loads(whole_calls[index].arguments)
        if size == 1:  # the name goes out as soon as it is written, long before the call ends
            assert len(deltas[0]) > 5


def test_a_call_not_written_in_the_usual_shape_comes_whole_at_the_end():
    odd = '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'
    for text in (odd, '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'):
        content, deltas, calls = _streamed("hermes", text, 3)
        assert content == "" and len(calls) == 1 and deltas == {0: [calls[0].as_dict(0)]}
    # parallel_tool_calls false: the second call never streams
    _, deltas, calls = _streamed("hermes", HERMES_REPLY, 4, single_call=True)
    assert list(deltas) == [0] and len(calls) == 1 and deltas[0][0]["id"] == calls[0].id


def test_a_named_call_cut_short_is_content_whole_and_truncated_arguments_streamed():
    """max_tokens cut the grammar's JSON: not streamed, the text is content (as before); streamed,
    its pieces already went out as the call's arguments, so nothing is repeated as content."""
    cut = '{"city": "Par'
    whole = ForcedCalls("get_weather")
    assert whole.feed(cut, final=True) == cut and whole.calls == [] and whole.take_deltas() == []
    streamed = AnswerSplitter(None, ForcedCalls("get_weather"))
    first, last = streamed.feed(cut[:5]), streamed.feed(cut[5:], final=True)
    assert first.content == last.content == "" and not last.tool_calls
    assert first.call_deltas[0]["function"] == {"name": "get_weather", "arguments": cut[:5]}
    assert last.call_deltas == [{"index": 0, "function": {"arguments": cut[5:]}}]


def test_required_calls_stream_one_after_another_and_keep_their_ids():
    """tool_choice required, streamed a few characters at a time: each call's header once its
    name is written, its arguments as they come, the final calls under the streamed ids; cut
    short, the calls already begun stay streamed and nothing becomes content."""
    answer = '[ {"name": "get_time", "parameters": {}} ,\n{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    splitter = AnswerSplitter(None, ForcedCalls(None))
    splits = [splitter.feed(answer[i:i + 7], final=i + 7 >= len(answer)) for i in range(0, len(answer), 7)]
    deltas = [d for split in splits for d in split.call_deltas or ()]
    assert not any(split.content for split in splits)
    heads = {d["index"]: d for d in deltas if "id" in d}
    assert [heads[i]["function"]["name"] for i in (0, 1)] == ["get_time", "get_weather"]
    assert [json.loads("".join(d["function"]["arguments"] for d in deltas if d["index"] == i)) for i in (0, 1)] == [
        {}, {"city": "Oslo"}]
    assert [call.id for call in splits[-1].tool_calls] == [heads[0]["id"], heads[1]["id"]]
    cut = answer[:85]
    streamed = AnswerSplitter(None, ForcedCalls(None))
    first, last = streamed.feed(cut[:40]), streamed.feed(cut[40:], final=True)
    assert first.content == last.content == "" and not last.tool_calls
    assert [d["function"]["name"] for d in (first.call_deltas or []) + (last.call_deltas or []) if "id" in d] == [
        "get_time", "get_weather"]
    whole = ForcedCalls(None)
    assert whole.feed(cut, final=True) == cut and whole.calls == [] and whole.take_deltas() == []


def test_a_tool_conversation_renders_through_the_template_as_transformers_renders_it():
    """Assistant tool_calls (arguments sent as JSON text) reach the template as objects, and tool
    results as the tool role with their call id, as transformers' apply_chat_template expects."""
    template = ("{%- if tools %}<|im_start|>system\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
                "\n</tools><|im_end|>\n{%- endif %}{%- for m in messages %}{%- if m.tool_calls %}<|im_start|>assistant"
                "{%- for call in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
                "{{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
                "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response id={{ m.tool_call_id }}>\n{{ m.content }}"
                "\n</tool_response><|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    body = {"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]}
    req = parse_chat(body)
    ours = compile_chat_template(template, "m").render(messages=list(req.messages), add_generation_prompt=True,
                                                        **req.template_args)
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    hf_messages = [body["messages"][0],
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   body["messages"][2]]
    assert ours == utils._compile_jinja_template(template).render(messages=hf_messages, tools=[WEATHER],
                                                                  add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"}' in ours and "<tool_response id=call_1>" in ours
    assert parse_chat({**body, "tool_choice": "none"}).template_args is None  # no tools offered


@pytest.fixture(scope="module")
def client():
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, tool_call_parser="hermes"))
    with Harness(recipe, [("w0", "both")], reply=HERMES_REPLY) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def _ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                          max_tokens=256, **kw)


def test_calls_come_back_as_openai_tool_calls_whole_and_streamed(client):
    whole = _ask(client, tools=[WEATHER]).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in whole.message.tool_calls)
    content, calls, finish = "", {}, None
    for chunk in _ask(client, tools=[WEATHER], stream=True):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            calls.setdefault(delta.index, []).append(delta)
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == "Let me check.\n"
    # each call streams as OpenAI's do: id, type and name first, then the arguments piece by piece
    assert [parts[0].function.name for _, parts in sorted(calls.items())] == ["get_weather", "get_weather"]
    assert all(parts[0].id.startswith("call_") and len(parts) > 1
               and not any(p.id or p.function.name for p in parts[1:]) for parts in calls.values())
    assert [json.loads("".join(p.function.arguments for p in parts))["city"] for _, parts in sorted(calls.items())] \
        == ["Paris", "Zürich"]


def test_parallel_tool_calls_false_keeps_the_first_and_tool_choice_none_parses_nothing(client):
    first = _ask(client, tools=[WEATHER], parallel_tool_calls=False).choices[0].message
    assert [json.loads(c.function.arguments)["city"] for c in first.tool_calls] == ["Paris"]
    none = _ask(client, tools=[WEATHER], tool_choice="none").choices[0]
    assert none.message.content == HERMES_REPLY and not none.message.tool_calls and none.finish_reason == "stop"
    plain = _ask(client).choices[0]  # no tools: the text is the answer
    assert plain.message.content == HERMES_REPLY and not plain.message.tool_calls


def _harness_for(reply: str):
    return Harness(make_recipe(), [("w0", "both")], reply=reply)


def test_response_format_asks_the_workers_for_json_of_the_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    with _harness_for('{"city": "Paris"}') as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        answer = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=64,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "city", "schema": schema}})
        assert json.loads(answer.choices[0].message.content) == {"city": "Paris"}
        assert json.loads(h.workers["w0"].requests[-1].sampling.json_schema) == schema
        c.completions.create(model=MODEL, prompt="?", max_tokens=8, extra_body={"response_format": {"type": "json_object"}})
        assert json.loads(h.workers["w0"].requests[-1].sampling.json_schema) == {"type": "object"}
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=8,
                                  response_format={"type": "text"})
        assert h.workers["w0"].requests[-1].sampling.json_schema is None
        for extra in ({"guided_json": schema}, {"structured_outputs": {"json": json.dumps(schema)}}):  # vLLM's names
            c.completions.create(model=MODEL, prompt="?", max_tokens=8, extra_body=extra)
            assert json.loads(h.workers["w0"].requests[-1].sampling.json_schema) == schema


def test_a_forced_tool_choice_is_the_calls_json_without_a_parser():
    """tool_choice required / named: the grammar makes the answer the call(s) as JSON (vLLM's shapes),
    so the recipe needs no tool_call_parser."""
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    with _harness_for('{"city": "Paris"}') as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        named = _ask(c, tools=[WEATHER, other], tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = named.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"})]
        assert json.loads(h.workers["w0"].requests[-1].sampling.json_schema) == WEATHER["function"]["parameters"]
        # streamed, the named call goes out as it is written: its id and name, then the arguments
        streamed = _ask(c, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                        stream=True)
        chunks = [chunk.choices[0] for chunk in streamed if chunk.choices]
        parts = [d for choice in chunks for d in (choice.delta.tool_calls or ())]
        assert parts[0].function.name == "get_weather" and parts[0].id.startswith("call_") and len(parts) > 2
        assert {d.index for d in parts} == {0} and not any(d.id or d.function.name for d in parts[1:])
        assert json.loads("".join(d.function.arguments for d in parts)) == {"city": "Paris"}
        assert chunks[-1].finish_reason == "tool_calls" and not any(choice.delta.content for choice in chunks)
    with _harness_for('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]') \
            as h, openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        # streamed, required calls go out as they are written too, one after the other
        required = _ask(c, tools=[WEATHER, other], tool_choice="required", stream=True)
        parts = [d for chunk in required for d in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices]
        heads = [d for d in parts if d.id]
        assert [(d.index, d.function.name) for d in heads] == [(0, "get_time"), (1, "get_weather")]
        assert len(parts) > 4 and [d.index for d in parts] == sorted(d.index for d in parts)
        assert [json.loads("".join(d.function.arguments for d in parts if d.index == i)) for i in (0, 1)] == [
            {}, {"city": "Oslo"}]
        schema = json.loads(h.workers["w0"].requests[-1].sampling.json_schema)
        assert schema["type"] == "array" and schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2


def test_an_assistant_prefill_is_continued():
    """continue_final_message: the prompt ends inside the assistant's partial answer (no new turn)."""
    with _harness_for('"Paris"}') as h, openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        messages = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": '{"capital": '}]
        answer = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False})
        assert answer.choices[0].message.content == '"Paris"}'
        assert bytes(h.workers["w0"].requests[-1].prompt_token_ids).endswith(b'<|assistant|>{"capital": ')


def test_an_agents_speculative_prefill_after_tool_calls_is_the_next_turns_prompt():
    """The speculative prefill of an agent's next turn renders the answer as the client sends it
    back (its content and its tool calls, through the same parse), not as the raw text the model
    wrote: the next turn, with the tool's result appended, then starts with the prefilled prompt."""
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, tool_call_parser="hermes"))
    with Harness(recipe, [("w0", "both")], reply=HERMES_REPLY) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
        user = {"role": "user", "content": "Weather?"}
        answer = c.chat.completions.create(model=MODEL, messages=[user], tools=[WEATHER], max_tokens=256,
                                           extra_body={"dyn": {"speculative_prefill": True}}).choices[0].message
        h.call(h.frontend.dispatcher.agent.wait_idle)
        speculative = [r for r in h.workers["w0"].requests if r.speculative]
        assert len(speculative) == 1 and answer.tool_calls
        echoed = answer.model_dump(exclude_none=True)
        results = [{"role": "tool", "tool_call_id": call.id, "content": "sunny"} for call in answer.tool_calls]
        c.chat.completions.create(model=MODEL, messages=[user, echoed, *results], tools=[WEATHER], max_tokens=4)
        next_prompt = h.workers["w0"].requests[-1].prompt_token_ids
        turn_start = len(h.frontend.tokenizer.encode("<|assistant|>"))  # (the byte tokenizer's template)
        prefilled = speculative[0].prompt_token_ids[:-turn_start]
        assert next_prompt[:len(prefilled)] == prefilled
        assert "<tool_call>" not in h.frontend.tokenizer.decode(prefilled)
