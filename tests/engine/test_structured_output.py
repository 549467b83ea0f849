"""Structured output on the torch engine: with a json_schema, SmolLM2's answer is JSON matching the
schema, with a regex or a grammar an answer matching that (xgrammar masks what it may sample), its
logprobs stay the model's, a request resumed after a migration continues the same grammar, and
engines or schemas that cannot do it refuse by name."""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("xgrammar")

from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.grammar import Grammars  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402
from dyn.errors import RequestError  # noqa: E402

SCHEMA = json.dumps({"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                                      "capital": {"type": "string", "maxLength": 20},
                                                      "population_millions": {"type": "number"}},
                     "required": ["country", "capital"], "additionalProperties": False})


@pytest.fixture(scope="module")
def engine_parts(smollm2_dir):
    runner = TorchModelRunner.from_pretrained(smollm2_dir, dtype="float32", block_size=16, num_blocks=64,
                                              max_context=512)
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    grammars = Grammars(smollm2_dir, runner.vocab_size, runner.eos_token_ids)
    return runner, tokenizer, grammars


def _run(engine: Engine, request: EngineRequest) -> list:
    engine.add_request(request)
    outputs = []
    for _ in range(500):
        if not engine.has_work():
            return outputs
        outputs += [out for out in engine.step() if out.request_id == request.request_id]
    raise AssertionError("engine did not finish")


def test_the_answer_is_json_matching_the_schema_and_a_resumed_request_continues_it(engine_parts):
    runner, tokenizer, grammars = engine_parts
    engine = Engine(runner, grammars=lambda: grammars)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which country has Paris as its capital? Answer in JSON."}]),
        add_special_tokens=False)
    constrained = SamplingParams(max_tokens=80, json_schema=SCHEMA, logprobs=True)
    outputs = _run(engine, EngineRequest("json", prompt, constrained))
    tokens = [t for out in outputs for t in out.token_ids]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].error is None
    answer = json.loads(tokenizer.decode(tokens))
    assert set(answer) <= {"country", "capital", "population_millions"} and {"country", "capital"} <= set(answer)
    assert all(isinstance(answer[k], str) for k in ("country", "capital"))
    free = _run(engine, EngineRequest("free", prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True)))
    assert [t for out in free for t in out.token_ids] != tokens  # the grammar changed the answer
    logprobs = [lp for out in outputs for lp in out.logprobs]
    assert all(math.isfinite(lp) and lp <= 0 for lp in logprobs)  # the model's own, not -inf from the mask
    # a migration: the first 5 tokens come back as the end of the prompt, and the grammar goes on from there
    resumed = _run(engine, EngineRequest("resumed", prompt + tokens[:5], replace(constrained, max_tokens=75),
                                         resumed_tokens=5))
    assert tokens[:5] + [t for out in resumed for t in out.token_ids] == tokens


def test_a_regex_or_a_grammar_of_choices_shapes_the_answer(engine_parts):
    """vLLM's guided_regex and guided_choice (which the frontend sends as an EBNF grammar of the
    choices): the answer matches the regex, or is exactly one of the choices."""
    runner, tokenizer, grammars = engine_parts
    engine = Engine(runner, grammars=lambda: grammars)

    def answer(question: str, **structured) -> str:
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                                  add_special_tokens=False)
        outputs = _run(engine, EngineRequest(question, prompt, SamplingParams(max_tokens=12, **structured)))
        assert outputs[-1].finish_reason == "stop"
        return tokenizer.decode([t for out in outputs for t in out.token_ids if t not in runner.eos_token_ids])

    assert re.fullmatch(r"[0-9]{4}", answer("In which year did the Second World War end?", regex="[0-9]{4}"))
    choices = ["Paris", "Berlin", "a \"capital\""]
    grammar = "root ::= " + " | ".join(json.dumps(c) for c in choices)
    assert answer("What is the capital of France?", grammar=grammar) in choices
    with pytest.raises(RequestError) as bad_regex:
        engine.add_request(EngineRequest("bad", [1, 2], SamplingParams(regex="(")))
    assert bad_regex.value.field == "regex"
    with pytest.raises(RequestError) as two:
        engine.add_request(EngineRequest("two", [1, 2], SamplingParams(regex="a", grammar='root ::= "a"')))
    assert two.value.field == "json_schema"


def test_refusals_name_what_and_where(engine_parts):
    runner, _, grammars = engine_parts
    with pytest.raises(RequestError) as bad_schema:
        Engine(runner, grammars=lambda: grammars).add_request(
            EngineRequest("bad", [1, 2], SamplingParams(json_schema='{"type": "no-such-type"}')))
    assert bad_schema.value.field == "response_format"
    with pytest.raises(RequestError) as no_grammars:  # the mock engine (and any engine built without them)
        Engine(runner).add_request(EngineRequest("m", [1, 2], SamplingParams(json_schema=SCHEMA)))
    assert no_grammars.value.field == "response_format" and "torch" in str(no_grammars.value)
    with pytest.raises(RequestError) as off_grammar:  # resumed output the grammar cannot have produced
        Engine(runner, grammars=lambda: grammars).add_request(
            EngineRequest("r", [1, 2, 3], SamplingParams(json_schema=SCHEMA), resumed_tokens=2))
    assert off_grammar.value.field == "resumed_tokens"


def test_a_grammar_is_compiled_once_by_the_preparation_off_the_engine_thread(engine_parts):
    """The compiler's first build (seconds) and a schema's compile (up to a second for a large one)
    run in the engine's preparation, on the worker's thread pool: add_request then finds the grammar
    compiled and the engine's steps never wait for it."""
    runner, _, grammars = engine_parts
    builds: list[str] = []

    def build() -> Grammars:
        builds.append(threading.current_thread().name)
        return grammars

    engine = Engine(runner, grammars=build)
    schema = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    request = EngineRequest("c", [1, 2], SamplingParams(max_tokens=4, json_schema=schema))
    assert engine.preparation(EngineRequest("plain", [1, 2], SamplingParams())) is None
    assert Engine(runner).preparation(request) is None  # no grammars: add_request refuses it by name
    prepare = engine.preparation(request)
    assert prepare is not None and not grammars.is_compiled(("json", schema))
    thread = threading.Thread(target=prepare, name="preparing")
    thread.start()
    thread.join()
    assert builds == ["preparing"] and grammars.is_compiled(("json", schema)) and engine.preparation(request) is None
    engine.add_request(request)
    assert builds == ["preparing"]
    bad = engine.preparation(EngineRequest("bad", [1, 2], SamplingParams(json_schema='{"type": "no-such-type"}')))
    with pytest.raises(RequestError) as refused:
        bad()
    assert refused.value.field == "response_format"


def test_a_prefill_workers_first_token_starts_the_decode_workers_grammar(engine_parts, smollm2_dir):
    """Disaggregated: the prefill engine samples the first token under the grammar, the decode engine
    imports the prompt KV, takes that token into its own grammar and finishes the same JSON."""
    runner, tokenizer, grammars = engine_parts
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which country has Paris as its capital? Answer in JSON."}]),
        add_special_tokens=False)
    constrained = SamplingParams(max_tokens=80, json_schema=SCHEMA)
    whole = [t for out in _run(Engine(runner, grammars=lambda: grammars), EngineRequest("one", prompt, constrained))
             for t in out.token_ids]
    prefill = Engine(runner, grammars=lambda: grammars)
    first = [t for out in _run(prefill, EngineRequest("p", prompt, constrained, prefill_only=True))
             for t in out.token_ids]
    export = prefill.export_kv("p")
    decode_runner = TorchModelRunner.from_pretrained(smollm2_dir, dtype="float32", block_size=16, num_blocks=64,
                                                     max_context=512)
    decode = Engine(decode_runner, grammars=lambda: grammars)
    imported = decode.begin_import(EngineRequest("p", prompt, constrained), export.block_hashes)
    for idx, view in zip(imported.missing_idx, imported.dest_views):
        view[:] = export.block_views[idx]
    decode.commit_import("p", export.first_token)
    rest = []
    while decode.has_work():
        rest += [t for out in decode.step() for t in out.token_ids]
    assert first == [export.first_token] and first + rest == whole
    json.loads(tokenizer.decode(whole))
