"""A request that leaves sampling fields out gets the model's recommended sampling
(generation_config.json, as vLLM's server applies it), under the recipe's own values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from frontend_harness import Harness, make_recipe

from dyn.config.loader import parse_recipe
from dyn.config.recipe import SamplingDefaultsSpec
from dyn.control.sampling import SamplingParams
from dyn.engine.loader import CheckpointError
from dyn.errors import ConfigError
from dyn.frontend.protocol import LEGACY_DEFAULT_MAX_TOKENS, SamplingDefaults, parse_chat, parse_completion
from dyn.frontend.sampling_defaults import resolve_sampling_defaults

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
LLAMA_31 = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128009],
            "temperature": 0.6, "top_p": 0.9}


def _model_dir(tmp_path: Path, config: dict | str) -> Path:
    (tmp_path / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


def test_omitted_fields_take_the_defaults_and_sent_ones_win():
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=100)
    plain = parse_chat(CHAT, defaults).sampling
    assert (plain.temperature, plain.top_p, plain.top_k) == (0.6, 0.9, 20)
    sent = parse_chat({**CHAT, "temperature": 0, "top_p": 1, "top_k": -1}, defaults).sampling
    assert (sent.temperature, sent.top_p, sent.top_k) == (0.0, 1.0, 0)  # -1: no top-k cut, as sent
    penalized = SamplingDefaults(repetition_penalty=1.1, presence_penalty=0.5)
    assert parse_chat(CHAT, penalized).sampling.repetition_penalty == 1.1
    assert parse_chat({**CHAT, "repetition_penalty": 1, "frequency_penalty": 0.3}, penalized).sampling == \
        SamplingParams(max_tokens=None, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3)
    # max_tokens: chat's default within the context left; an explicit limit and completions' 16 stay
    chat = parse_chat(CHAT, defaults)
    assert chat.for_prompt(10, 4096, defaults.max_tokens).sampling.max_tokens == 100
    assert chat.for_prompt(4000, 4096, defaults.max_tokens).sampling.max_tokens == 96
    assert parse_chat({**CHAT, "max_tokens": 500}, defaults).for_prompt(10, 4096, 100).sampling.max_tokens == 500
    completion = parse_completion({"model": "m", "prompt": "hi"}, defaults)
    assert completion.sampling.max_tokens == LEGACY_DEFAULT_MAX_TOKENS
    assert completion.sampling.temperature == 0.6


def test_the_model_file_then_the_recipe(tmp_path):
    model = _model_dir(tmp_path, {**LLAMA_31, "top_k": 20, "max_new_tokens": 256, "repetition_penalty": 1.05,
                                  "min_p": 0.05, "typical_p": 0.9})
    resolved = resolve_sampling_defaults(SamplingDefaultsSpec(), model)
    assert resolved.defaults == SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, max_tokens=256,
                                                 repetition_penalty=1.05)
    assert resolved.not_applied == {"typical_p": 0.9}  # named in the log, not applied
    assert str(model / "generation_config.json") in resolved.describe()

    ours = resolve_sampling_defaults(SamplingDefaultsSpec(temperature=0.2, top_k=0, repetition_penalty=1), model)
    assert ours.defaults == SamplingDefaults(temperature=0.2, top_p=0.9, top_k=0, min_p=0.05, max_tokens=256)
    assert ours.origin["temperature"] == "recipe" and ours.origin["top_p"].endswith("generation_config.json")

    openai_like = resolve_sampling_defaults(SamplingDefaultsSpec(from_model=False, top_p=0.95), model)
    assert openai_like.defaults == SamplingDefaults(top_p=0.95)
    assert openai_like.not_applied == {}


def test_no_file_or_no_checkpoint_means_openais_defaults(tmp_path):
    assert resolve_sampling_defaults(SamplingDefaultsSpec(), tmp_path).defaults == SamplingDefaults()
    assert resolve_sampling_defaults(SamplingDefaultsSpec(), None).defaults == SamplingDefaults()
    # a file with only token ids (what the GGUF conversion writes) recommends nothing
    eos_only = _model_dir(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    assert resolve_sampling_defaults(SamplingDefaultsSpec(), eos_only).origin == {}


@pytest.mark.parametrize("config, says", [
    ({"temperature": 5.0}, "temperature must be in [0, 2], got 5"),
    ({"top_p": "high"}, "top_p must be a number"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 10]"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_a_bad_model_file_is_an_error_naming_file_and_key(tmp_path, config, says):
    model = _model_dir(tmp_path, config)
    with pytest.raises(CheckpointError) as err:
        resolve_sampling_defaults(SamplingDefaultsSpec(), model)
    assert str(model / "generation_config.json") in str(err.value) and says in str(err.value)
    # ... and the recipe can serve without the file
    assert resolve_sampling_defaults(SamplingDefaultsSpec(from_model=False), model).defaults == SamplingDefaults()


def test_recipe_values_are_checked_with_file_and_line():
    with pytest.raises(ConfigError) as err:
        parse_recipe("name: t\nmodel:\n  engine: mock\n  sampling_defaults:\n    top_p: 0\n"
                     "workers: {both: {}}\n", "r.yaml")
    assert str(err.value).startswith("r.yaml:5: model.sampling_defaults.top_p: must be in (0, 1]")


def test_requests_through_the_frontend_reach_the_worker_with_the_models_sampling(tmp_path):
    from dyn.engine.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    (model / "generation_config.json").write_text(json.dumps({**LLAMA_31, "max_new_tokens": 5}))
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, path=str(model), name="tiny"))
    with Harness(recipe, [("w0", "both")]) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as client:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, max_tokens=3)
        plain, sent = (r.sampling for r in h.workers["w0"].requests)
    assert (plain.temperature, plain.top_p, plain.max_tokens) == (0.6, 0.9, 5)
    assert (sent.temperature, sent.top_p, sent.max_tokens) == (0.0, 0.9, 3)
