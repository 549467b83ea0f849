"""The HTTP edge builds the one SamplingParams that reaches the engine."""

from __future__ import annotations

import json

import pytest

from dyn.control.requests import REQUEST_CODEC, GenerateRequest
from dyn.control.sampling import SamplingParams
from dyn.frontend.protocol import LEGACY_DEFAULT_MAX_TOKENS, ApiError, parse_chat, parse_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_body_becomes_typed_sampling_params():
    req = parse_chat({**CHAT, "max_tokens": 9, "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 3,
                      "stop": "END", "stop_token_ids": [7], "logprobs": True, "dyn": {"ignore_eos": True}})
    assert req.sampling == SamplingParams(max_tokens=9, temperature=0.0, top_p=0.5, top_k=0, seed=3,
                                          stop_token_ids=(7,), stop=("END",), ignore_eos=True, logprobs=True)
    # what goes on the wire is that same value (the codec round-trips it as a SamplingParams)
    wire = GenerateRequest("r", [1, 2], sampling=req.sampling)
    assert REQUEST_CODEC.decode(REQUEST_CODEC.encode(wire)) == wire


def test_logit_bias_becomes_sorted_ids_and_biases_and_crosses_the_wire():
    req = parse_chat({**CHAT, "logit_bias": {"50": -100, "7": 2.5}})
    assert (req.sampling.logit_bias_ids, req.sampling.logit_bias_values) == ((7, 50), (2.5, -100.0))
    wire = GenerateRequest("r", [1, 2], sampling=req.sampling)
    assert REQUEST_CODEC.decode(REQUEST_CODEC.encode(wire)) == wire
    assert parse_chat({**CHAT, "logit_bias": {}}).sampling.logit_bias_ids == ()
    assert parse_chat({**CHAT, "allowed_token_ids": [9, 3, 9]}).sampling.allowed_token_ids == (3, 9)


def test_bad_words_become_token_sequences_by_vllms_rule():
    """Each word as written (leading spaces dropped), and after a space where that gives as many
    tokens but another first one (the word inside a sentence); they cross the wire."""
    vocab = {"hello": [5], " hello": [7], "ice cream": [1, 2], " ice cream": [3, 2], "a b": [4, 5],
             " a b": [4, 5], "x": [9], " x": [10, 9], "": [], " ": []}
    req = parse_chat({**CHAT, "bad_words": ["hello", "  ice cream", "a b", "x", "hello"]})
    assert req.bad_words == ("hello", "  ice cream", "a b", "x")  # (duplicates once)
    sequences = req.with_bad_words(vocab.__getitem__).sampling.bad_words_token_ids
    assert sequences == ((5,), (7,), (1, 2), (3, 2), (4, 5), (9,))
    wire = GenerateRequest("r", [1, 2], sampling=req.with_bad_words(vocab.__getitem__).sampling)
    assert REQUEST_CODEC.decode(REQUEST_CODEC.encode(wire)) == wire
    with pytest.raises(ApiError) as empty:
        parse_chat({**CHAT, "bad_words": ["hello", "zzz"]}).with_bad_words(lambda text: [] if "z" in text else [1])
    assert empty.value.param == "bad_words" and "bad_words[1]" in empty.value.message
    with pytest.raises(ApiError) as many:
        parse_chat({**CHAT, "bad_words": [f"w{i}" for i in range(100)]}).with_bad_words(lambda text: [len(text)])
    assert many.value.param == "bad_words" and "200 token sequences" in many.value.message
    assert parse_chat(CHAT).with_bad_words(vocab.__getitem__).sampling.bad_words_token_ids == ()


def test_every_spelling_of_structured_output_becomes_one_grammar_field():
    """OpenAI's response_format and vLLM's guided_* / structured_outputs: a JSON schema, a regex or
    an EBNF grammar (a choice is a grammar of its strings, escaped as JSON string literals)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_text = json.dumps(schema)
    for body, field, text in [
            ({"response_format": {"type": "json_object"}}, "json_schema", '{"type": "object"}'),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}},
             "json_schema", as_text),
            ({"guided_json": schema}, "json_schema", as_text), ({"guided_json": as_text}, "json_schema", as_text),
            ({"structured_outputs": {"json": as_text}}, "json_schema", as_text),
            ({"structured_outputs": {"json_object": True}}, "json_schema", '{"type": "object"}'),
            ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+"), ({"structured_outputs": {"regex": "a|b"}}, "regex", "a|b"),
            ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
            ({"guided_choice": ["yes", 'say "no"\n']}, "grammar", 'root ::= "yes" | "say \\"no\\"\\n"'),
            ({"structured_outputs": {"choice": ["é"], "json_object": False}}, "grammar", 'root ::= "é"')]:
        sampling = parse_chat({**CHAT, **body}).sampling
        assert sampling.structured == ({"json_schema": "json"}.get(field, field), text), body
        assert getattr(sampling, field) == text
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}).sampling.structured is None


def test_max_tokens_defaults_and_resolution():
    chat = parse_chat(CHAT)
    assert chat.sampling.max_tokens is None and chat.sampling.temperature == 1.0  # OpenAI's defaults
    assert chat.for_prompt(100, 4096).sampling.max_tokens == 3996
    assert chat.for_prompt(4096, 4096).sampling.max_tokens == 1
    completion = parse_completion({"model": "m", "prompt": "hi"})
    assert completion.sampling.max_tokens == LEGACY_DEFAULT_MAX_TOKENS
    assert completion.for_prompt(100, 4096) is completion  # an explicit limit stays as sent
    assert parse_chat({**CHAT, "max_completion_tokens": 5, "max_tokens": 50}).sampling.max_tokens == 5


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", 3.0), ("top_p", 0.0),
                                          ("top_k", -2), ("stop_token_ids", [-1]), ("seed", "x")])
def test_bad_sampling_is_refused_at_the_edge_naming_the_field(field, value):
    with pytest.raises(ApiError) as err:
        parse_chat({**CHAT, field: value})
    assert err.value.param == field and err.value.status == 400


def test_a_body_without_hint_objects_gets_the_same_hints_as_empty_ones():
    from dyn.frontend.hints import Hints, parse_hints

    plain = parse_hints({"model": "m"})
    assert plain == (Hints(), ())
    assert plain == parse_hints({"model": "m", "dyn": {}, "nvext": {"agent_hints": {}, "session_control": {}}})
    assert parse_hints({"model": "m", "dyn": None, "nvext": None}) == plain


def test_chat_template_kwargs_are_template_variables_and_never_the_servers_own():
    assert parse_chat({**CHAT, "chat_template_kwargs": {"enable_thinking": False}}).template_kwargs == {
        "enable_thinking": False}
    assert parse_chat(CHAT).template_kwargs is None
    for kwargs, param in [([1], "chat_template_kwargs"), ({"not a name": 1}, "chat_template_kwargs"),
                          ({"messages": []}, "chat_template_kwargs.messages"),
                          ({"bos_token": ""}, "chat_template_kwargs.bos_token"),
                          ({"namespace": "x"}, "chat_template_kwargs.namespace"),
                          ({"raise_exception": 1}, "chat_template_kwargs.raise_exception")]:
        with pytest.raises(ApiError) as err:
            parse_chat({**CHAT, "chat_template_kwargs": kwargs})
        assert err.value.param == param and err.value.status == 400
