"""Sampling: greedy, temperature, top-k, top-p, seeded streams, logprobs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dyn.engine.backend import SamplingParams  # noqa: E402
from dyn.engine.sampling import sample  # noqa: E402


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_take_the_argmax():
    logits = _logits()
    params = [SamplingParams(), SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [0, 0, 0])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None, None, None]


def test_seeded_stream_depends_only_on_seed_and_index():
    logits = _logits(1) / 3
    p = SamplingParams(temperature=1.0, seed=123)
    draws = [sample(logits, [p], [i]).token_ids[0] for i in range(40)]
    again = [sample(logits, [p], [i]).token_ids[0] for i in range(40)]
    assert draws == again
    assert len(set(draws)) > 5  # a real distribution, not a constant
    # the same request in another row of a bigger batch draws the same token
    batch = torch.cat([_logits(2, seed=9), logits])
    others = [SamplingParams(temperature=0.7, seed=5), SamplingParams()]
    assert sample(batch, [*others, p], [3, 0, 7]).token_ids[2] == draws[7]
    other_seed = [sample(logits, [SamplingParams(temperature=1.0, seed=124)], [i]).token_ids[0]
                  for i in range(40)]
    assert other_seed != draws


def test_top_k_limits_the_support():
    logits = _logits(1, vocab=100)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=5, seed=1)
    drawn = {sample(logits, [p], [i]).token_ids[0] for i in range(200)}
    assert drawn <= allowed and len(drawn) >= 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.75, seed=2)
    drawn = {sample(logits, [p], [i]).token_ids[0] for i in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there
    tiny = SamplingParams(temperature=1.0, top_p=0.01, seed=2)
    assert {sample(logits, [tiny], [i]).token_ids[0] for i in range(50)} == {0}


def test_temperature_sharpens_and_flattens():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    cold = [sample(logits, [SamplingParams(temperature=0.05, seed=3)], [i]).token_ids[0] for i in range(100)]
    hot = [sample(logits, [SamplingParams(temperature=1.0, seed=3)], [i]).token_ids[0] for i in range(400)]
    assert cold.count(0) == 100
    assert 0.5 < hot.count(0) / 400 < 0.7


def test_logprobs_are_those_of_the_model_distribution():
    logits = _logits(2)
    params = [SamplingParams(logprobs=True), SamplingParams(temperature=1.0, seed=4, logprobs=True)]
    out = sample(logits, params, [0, 0])
    expected = torch.log_softmax(logits, -1)
    for row in range(2):
        assert out.logprobs[row] == pytest.approx(expected[row, out.token_ids[row]].item(), abs=1e-6)


def test_penalties_follow_openais_and_vllms_definitions():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1, 0.5]])
    context = [0, 2, 4, 4]  # prompt [0, 2], output [4, 4]
    # repetition: every seen token (prompt or output), positive logits divided, negative multiplied
    rep = sample(logits, [SamplingParams(repetition_penalty=2.0, logprobs=True)], [2], contexts=[context])
    assert rep.token_ids == [1]  # 2.0 / 2 = 1.0 < 1.9
    assert rep.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())  # the model's own
    # frequency (per occurrence) and presence (once) count the output only, never the prompt
    freq = SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5)
    out = sample(torch.tensor([[0.0, 0.0, -1.0, -1.0, 2.4]]), [freq], [2], contexts=[context])
    assert out.token_ids == [0]  # 2.4 - 2 * 1.0 - 0.5 = -0.1 < 0.0, and token 0 (prompt) is not penalized
    # a row without penalties in the same batch is untouched, and no contexts means none are needed
    batch = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    mixed = sample(batch, [SamplingParams(repetition_penalty=2.0), SamplingParams()], [0, 0],
                   contexts=[[0], [0]])
    assert mixed.token_ids == [1, 0]
    assert sample(batch, [SamplingParams(), SamplingParams()], [0, 0]).token_ids == [0, 0]


def test_min_p_keeps_only_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, min_p=0.5, seed=1)
    draws = {sample(logits, [params], [i]).token_ids[0] for i in range(200)}
    assert draws == {0, 1}  # 0.15 and 0.05 are below 0.5 * 0.5
    assert {sample(logits, [SamplingParams(temperature=1.0, seed=1)], [i]).token_ids[0]
            for i in range(200)} == {0, 1, 2, 3}


def test_top_logprobs_are_the_models_likeliest_per_row():
    logits = _logits(3)
    params = [SamplingParams(logprobs=True, top_logprobs=3), SamplingParams(logprobs=True),
              SamplingParams(temperature=0.0, logprobs=True, top_logprobs=1, repetition_penalty=5.0)]
    out = sample(logits, params, [0, 0, 0], contexts=[[], [], [int(logits[2].argmax())]])
    reference = torch.log_softmax(logits, -1)
    ids, values = out.top[0]
    assert ids == reference[0].argsort(descending=True)[:3].tolist()
    assert values == pytest.approx(reference[0, ids].tolist())
    assert out.top[1] is None  # logprobs without top_logprobs
    # alternatives are the model's own (before penalties), as the sampled token's logprob is
    assert out.top[2][0] == [int(logits[2].argmax())] and out.token_ids[2] != out.top[2][0][0]


def test_the_engine_hands_each_tokens_alternatives_over(tmp_path):
    from dyn.engine.backend import EngineRequest
    from dyn.engine.engine import Engine
    from dyn.engine.tiny import write_tiny_checkpoint
    from dyn.engine.torch_runner import TorchModelRunner

    path = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    runner = TorchModelRunner.from_pretrained(path, dtype="float32", device="cpu", block_size=8, num_blocks=16,
                                              max_context=64)
    engine = Engine(runner)
    engine.add_request(EngineRequest("r", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True,
                                                                     top_logprobs=4)))
    outputs = [out for _ in range(10) if engine.has_work() for out in engine.step()]
    assert [len(out.top_ids[0]) for out in outputs] == [4, 4, 4]
    for out in outputs:  # greedy: the sampled token is the likeliest, with the same logprob
        assert out.top_ids[0][0] == out.token_ids[0] and out.top_logprobs[0][0] == pytest.approx(out.logprobs[0])
        assert out.top_logprobs[0] == sorted(out.top_logprobs[0], reverse=True)
