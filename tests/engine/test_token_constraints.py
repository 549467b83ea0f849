"""Sampling fields that change which token may come, on SmolLM2 and the torch engine: min_tokens
(vLLM's: EOS and stop_token_ids wait for it), logit_bias (OpenAI's), allowed_token_ids and
bad_words (vLLM's)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.tokenizer import Tokenizer  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402
from dyn.errors import RequestError  # noqa: E402


def _answer(engine: Engine, rid: str, prompt: list[int], sampling: SamplingParams) -> tuple[list[int], str]:
    engine.add_request(EngineRequest(rid, prompt, sampling))
    tokens, reason = [], None
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
            reason = out.finish_reason or reason
    return tokens, reason


@pytest.fixture(scope="module")
def say_hi(smollm2_dir):
    """SmolLM2's runner, its tokenizer and the prompt of a chat turn "Say hi."."""
    runner = TorchModelRunner.from_pretrained(smollm2_dir, dtype="float32", block_size=16, num_blocks=64,
                                              max_context=512)
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                              add_special_tokens=False)
    return runner, tokenizer, prompt


def test_eos_and_stop_tokens_wait_for_min_tokens(say_hi):
    runner, tokenizer, prompt = say_hi
    engine = Engine(runner)
    free, reason = _answer(engine, "free", prompt, SamplingParams(max_tokens=60))
    assert reason == "stop" and len(free) < 50 and free[-1] in runner.eos_token_ids
    at_least = len(free) + 10
    held, reason = _answer(engine, "held", prompt, SamplingParams(max_tokens=80, min_tokens=at_least))
    assert len(held) >= at_least and not set(held[:at_least]) & set(runner.eos_token_ids)
    assert held[:len(free) - 1] == free[:-1]  # the same greedy answer up to where the EOS was
    # a stop token id waits the same way (the answer's first token, asked to stop the answer)
    first = free[0]
    stopped, reason = _answer(engine, "stop", prompt, SamplingParams(max_tokens=60, stop_token_ids=(first,)))
    assert stopped == [first] and reason == "stop"
    waited, _ = _answer(engine, "wait", prompt, SamplingParams(max_tokens=60, stop_token_ids=(first,), min_tokens=3))
    assert len(waited) > 3 and first not in waited[:3]
    with pytest.raises(RequestError) as bad:
        engine.add_request(EngineRequest("bad", prompt, SamplingParams(max_tokens=5, min_tokens=6)))
    assert bad.value.field == "min_tokens"


def test_logit_bias_and_allowed_token_ids_change_what_is_sampled_not_the_logprobs(say_hi):
    """OpenAI's logit_bias on the torch engine: -100 on the greedy answer's first token makes another
    come first; +100 on a token makes it the answer's first; the logprobs reported stay the
    model's own. vLLM's allowed_token_ids keeps the answer to those tokens. The mock engine (no
    logits) refuses both by name."""
    runner, tokenizer, prompt = say_hi
    engine = Engine(runner)
    free, _ = _answer(engine, "free", prompt, SamplingParams(max_tokens=3))
    banned, _ = _answer(engine, "ban", prompt, SamplingParams(max_tokens=3, logit_bias_ids=(free[0],),
                                                              logit_bias_values=(-100.0,)))
    assert banned[0] != free[0]
    forced_token = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    engine.add_request(EngineRequest("force", prompt, SamplingParams(
        max_tokens=1, logprobs=True, logit_bias_ids=(forced_token,), logit_bias_values=(100.0,))))
    out = [o for o in engine.step() if o.request_id == "force"][0]
    assert out.token_ids == [forced_token] and out.logprobs[0] < -5  # unlikely for the model itself
    allowed = tuple(tokenizer.encode(" Yes No", add_special_tokens=False))
    only, _ = _answer(engine, "only", prompt, SamplingParams(max_tokens=4, allowed_token_ids=allowed))
    assert len(only) == 4 and set(only) <= set(allowed)  # (no EOS allowed either: it runs to max_tokens)
    from dyn.config.recipe import MockTiming
    from dyn.engine.mock import MockEngine

    with pytest.raises(RequestError) as refused:
        MockEngine(MockTiming()).add_request(EngineRequest("m", [1, 2], SamplingParams(
            max_tokens=2, logit_bias_ids=(5,), logit_bias_values=(1.0,))))
    assert refused.value.field == "logit_bias_ids"
    with pytest.raises(RequestError) as bad:
        engine.add_request(EngineRequest("bad", prompt, SamplingParams(max_tokens=2, logit_bias_ids=(10**7,),
                                                                       logit_bias_values=(1.0,))))
    assert bad.value.field == "logit_bias_ids"


def test_bad_words_ban_a_words_last_token_after_the_rest_of_it_in_the_output(say_hi):
    """vLLM's bad_words rule: a one-token word is never sampled; a longer one loses its last token
    only where the output (not the prompt) already ends with the rest of it."""
    runner, tokenizer, prompt = say_hi
    engine = Engine(runner)
    free, _ = _answer(engine, "free", prompt, SamplingParams(max_tokens=4))
    one, _ = _answer(engine, "one", prompt, SamplingParams(max_tokens=4, bad_words_token_ids=((free[0],),)))
    assert one[0] != free[0] and free[0] not in one
    two, _ = _answer(engine, "two", prompt, SamplingParams(max_tokens=4, bad_words_token_ids=((free[1], free[2]),)))
    assert two[:2] == free[:2] and two[2] != free[2]
    across, _ = _answer(engine, "across", prompt, SamplingParams(max_tokens=4,
                                                                  bad_words_token_ids=((prompt[-1], free[0]),)))
    assert across == free  # (the prompt's last token does not count as the word's start)
    with pytest.raises(RequestError) as bad:
        engine.add_request(EngineRequest("bad", prompt, SamplingParams(max_tokens=2, bad_words_token_ids=((10**7,),))))
    assert bad.value.field == "bad_words_token_ids"
    from dyn.config.recipe import MockTiming
    from dyn.engine.mock import MockEngine

    with pytest.raises(RequestError) as refused:
        MockEngine(MockTiming()).add_request(EngineRequest("m", [1, 2], SamplingParams(
            max_tokens=2, bad_words_token_ids=((5,),))))
    assert refused.value.field == "bad_words_token_ids"
