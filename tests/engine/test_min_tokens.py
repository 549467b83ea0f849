"""min_tokens (vLLM's extension): SmolLM2 ends a short chat answer with its EOS; with min_tokens the
EOS (and stop_token_ids) cannot come before that many tokens, and the answer then ends as usual."""

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


def test_eos_and_stop_tokens_wait_for_min_tokens(smollm2_dir):
    runner = TorchModelRunner.from_pretrained(smollm2_dir, dtype="float32", block_size=16, num_blocks=64,
                                              max_context=512)
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    engine = Engine(runner)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                              add_special_tokens=False)
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
