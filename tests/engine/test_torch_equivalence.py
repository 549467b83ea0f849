"""The torch engine's logits and greedy tokens match transformers on the same weights.

Every request's logits are captured at every position the engine computes
(prefill chunks and decode steps) and compared with one teacher-forced
transformers forward over prompt + generated tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dyn.engine.backend import EngineRequest, SamplingParams  # noqa: E402
from dyn.engine.engine import Engine  # noqa: E402
from dyn.engine.torch_runner import TorchModelRunner  # noqa: E402
from dyn.errors import RequestError  # noqa: E402

VARIANTS = ["llama", "llama3-rope-tied", "llama-sharded", "qwen2", "qwen3"]  # built in conftest.py
VOCAB = 320

BLOCK = 8
DECODE_STEPS = 20
ATOL = 2e-4


def _runner(path: Path, num_blocks: int = 128) -> TorchModelRunner:
    runner = TorchModelRunner.from_pretrained(path, dtype="float32", device="cpu", block_size=BLOCK,
                                              num_blocks=num_blocks, max_context=256)
    runner.capture_logits = True
    return runner


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _greedy(prompt: list[int], rid: str, **kw) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True), **kw)


def _drain(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    raise AssertionError("engine did not finish")


def _check_against_hf(hf, runner: TorchModelRunner, rid: str, prompt: list[int], generated: list[int]) -> None:
    ours = torch.cat(runner.captured_logits[rid])
    full = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        ref = hf(full).logits[0].float()
    # positions served from the prefix cache were not computed: compare the tail
    ref = ref[-ours.shape[0]:]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"{rid}: max |logit diff| {err:.2e} over {ours.shape[0]} positions"
    hf_greedy = ref[-len(generated):].argmax(-1).tolist()
    assert generated == hf_greedy, f"{rid}: greedy tokens differ from transformers"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_with_chunked_prefill_matches_transformers(variant, hf_checkpoint, hf_model):
    path = hf_checkpoint(variant)
    runner = _runner(path)
    # 32 tokens per step against 103 prompt tokens: prompts are split into chunks and
    # later prompts prefill while earlier ones decode.
    engine = Engine(runner, max_batch_size=8, max_num_batched_tokens=32)
    assert not engine.kv_on_cuda  # host memory: the KV hand-off offers no cuda_ipc for it
    prompts = _prompts([5, 17, 33, 48])
    for i, p in enumerate(prompts):
        engine.add_request(_greedy(p, f"r{i}"))
    tokens = _drain(engine)
    assert sum(len(chunks) for chunks in runner.captured_logits.values()) > len(prompts) * (DECODE_STEPS + 1)
    assert max(len(c) for c in runner.captured_logits["r3"][:3]) <= 32
    for i, p in enumerate(prompts):
        assert len(tokens[f"r{i}"]) == DECODE_STEPS + 1
        _check_against_hf(hf_model(path), runner, f"r{i}", p, tokens[f"r{i}"])


def test_many_sequences_across_decode_groups_match_transformers(hf_checkpoint, hf_model):
    from dyn.engine.layers.attention import DECODE_GROUP

    path = hf_checkpoint("llama")
    runner = _runner(path, num_blocks=256)
    engine = Engine(runner, max_batch_size=64, max_num_batched_tokens=256)
    lengths = [3 + 5 * i for i in range(DECODE_GROUP + 5)]  # two padded decode batches of mixed lengths
    prompts = _prompts(lengths, seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, SamplingParams(max_tokens=4, ignore_eos=True)))
    tokens = _drain(engine)
    hf = hf_model(path)
    for i, p in enumerate(prompts):
        ours = torch.cat(runner.captured_logits[f"r{i}"])
        with torch.no_grad():
            ref = hf(torch.tensor([p + tokens[f"r{i}"][:-1]])).logits[0]
        assert (ours - ref).abs().max().item() < ATOL
        assert ref[-4:].argmax(-1).tolist() == tokens[f"r{i}"]


def test_prefix_cache_hit_matches_transformers(hf_checkpoint, hf_model):
    path = hf_checkpoint("llama")
    runner = _runner(path)
    engine = Engine(runner, max_batch_size=8, max_num_batched_tokens=64)
    base = _prompts([45], seed=1)[0]
    engine.add_request(_greedy(base, "first"))
    _drain(engine)
    follow = base[:35] + _prompts([9], seed=2)[0]
    engine.add_request(_greedy(follow, "second"))
    first_out = engine.step()[0]
    assert first_out.num_cached_tokens == 32  # four full blocks of 8 shared
    tokens = {"second": first_out.token_ids + _drain(engine)["second"]}
    assert engine.stats().prefix_hit_blocks >= 4
    assert sum(c.shape[0] for c in runner.captured_logits["second"]) == len(follow) - 32 + DECODE_STEPS
    _check_against_hf(hf_model(path), runner, "second", follow, tokens["second"])


def test_export_import_between_engines_matches_transformers(hf_checkpoint, hf_model):
    path = hf_checkpoint("qwen3")
    prompt = _prompts([29], seed=3)[0]
    prefill = Engine(_runner(path), max_num_batched_tokens=16)
    prefill.add_request(EngineRequest("x", prompt, SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True),
                                      prefill_only=True))
    first = _drain(prefill)["x"]
    export = prefill.export_kv("x")
    assert len(export.block_hashes) == 29 // BLOCK

    decode_runner = _runner(path)
    decode = Engine(decode_runner)
    request = _greedy(prompt, "x")
    imp = decode.begin_import(request, export.block_hashes)
    assert imp.missing_idx == list(range(len(export.block_hashes)))
    for idx, dest in zip(imp.missing_idx, imp.dest_views):
        dest[:] = export.block_views[idx]
    prefill.release_export("x")
    decode.commit_import("x", export.first_token)
    tokens = first + _drain(decode)["x"]
    assert len(tokens) == DECODE_STEPS + 1
    # the decode engine computed only the partial last block's tokens and the decode steps
    computed = sum(c.shape[0] for c in decode_runner.captured_logits["x"])
    assert computed == (29 - 24) + DECODE_STEPS
    _check_against_hf(hf_model(path), decode_runner, "x", prompt, tokens)

    alone = Engine(_runner(path))
    alone.add_request(_greedy(prompt, "x"))
    assert _drain(alone)["x"] == tokens


def test_seeded_sampling_is_independent_of_batch_and_chunking(hf_checkpoint):
    path = hf_checkpoint("llama")
    prompts = _prompts([12, 30, 7], seed=4)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=77, ignore_eos=True)
    together = Engine(_runner(path), max_num_batched_tokens=16)
    for i, p in enumerate(prompts):
        together.add_request(EngineRequest(f"r{i}", p, sp))
    batched = _drain(together)
    alone = Engine(_runner(path), max_num_batched_tokens=256)
    alone.add_request(EngineRequest("r1", prompts[1], sp))
    assert _drain(alone)["r1"] == batched["r1"]
    other_seed = Engine(_runner(path))
    other_seed.add_request(EngineRequest("r1", prompts[1], SamplingParams(
        max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=78, ignore_eos=True)))
    assert _drain(other_seed)["r1"] != batched["r1"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_resumed_request_continues_as_the_undisturbed_one(hf_checkpoint, temperature):
    """A migrated request (its earlier output at the prompt's tail, resumed_tokens) continues exactly
    as if never moved: its seeded stream goes on from where it was, frequency and presence
    penalties count the earlier output, and a bad word split across the migration point is caught."""
    path = hf_checkpoint("llama")
    (prompt,) = _prompts([14], seed=9)

    def run(sampling: SamplingParams, tokens: list[int] = (), **kw) -> list[int]:
        engine = Engine(_runner(path))
        engine.add_request(EngineRequest("r", prompt + list(tokens), sampling, resumed_tokens=len(tokens), **kw))
        return _drain(engine)["r"]

    base = SamplingParams(max_tokens=12, temperature=temperature, seed=77, ignore_eos=True, frequency_penalty=0.8,
                          presence_penalty=0.4)
    free = run(base)
    banned = replace(base, bad_words_token_ids=((free[4], free[5]),))  # the word spans positions 4 and 5
    whole = run(banned)
    assert whole[:5] == free[:5] and whole[5] != free[5]  # (the ban acts right after the cut below)
    first = run(replace(banned, max_tokens=5))
    assert first == whole[:5]
    assert run(replace(banned, max_tokens=7), first) == whole[5:]


def test_block_view_is_the_pool_block(hf_checkpoint):
    runner = _runner(hf_checkpoint("llama"), num_blocks=4)
    view = runner.block_view(2)
    assert isinstance(view, memoryview) and view.nbytes == runner.block_bytes
    c = runner.model.config
    assert runner.block_bytes == 2 * c.num_layers * BLOCK * c.num_kv_heads * c.head_dim * 4
    view[:] = bytes(range(256)) * (runner.block_bytes // 256)
    assert runner.pool[2].view(-1).view(torch.uint8)[:256].tolist() == list(range(256))
    assert runner.pool[1].abs().sum() == 0
    runner.copy_block(2, 3)
    assert bytes(runner.block_view(3)) == bytes(view)


def test_repetition_penalty_matches_transformers_generate(hf_checkpoint, hf_model):
    """Greedy with repetition_penalty over prompt + output, as transformers' logits processor (and
    vLLM) apply it, in a batch beside an unpenalized request that stays plain greedy."""
    path = hf_checkpoint("llama")
    hf = hf_model(path)
    prompt, other = _prompts([10, 14], seed=7)
    engine = Engine(_runner(path))
    engine.add_request(EngineRequest("pen", prompt, SamplingParams(max_tokens=DECODE_STEPS, ignore_eos=True,
                                                                   repetition_penalty=1.3)))
    engine.add_request(EngineRequest("plain", other, SamplingParams(max_tokens=DECODE_STEPS, ignore_eos=True)))
    tokens = _drain(engine)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS, do_sample=False,
                          repetition_penalty=1.3, min_new_tokens=DECODE_STEPS, pad_token_id=0)
        plain = hf.generate(torch.tensor([other]), max_new_tokens=DECODE_STEPS, do_sample=False,
                            min_new_tokens=DECODE_STEPS, pad_token_id=0)
    assert tokens["pen"] == ref[0, len(prompt):].tolist()
    assert tokens["plain"] == plain[0, len(other):].tolist()
    unpenalized = Engine(_runner(path))
    unpenalized.add_request(_greedy(prompt, "x"))
    assert _drain(unpenalized)["x"][:DECODE_STEPS] != tokens["pen"]  # the penalty changed the answer


def test_prompt_logprobs_match_transformers_through_chunks_and_a_cached_prefix(hf_checkpoint, hf_model):
    """prompt_logprobs: each prompt token's logprob and rank under transformers' teacher-forced forward,
    and the k likeliest there, whatever the prefill chunking; a prompt already in the prefix cache is
    run whole again (a cached block has no logits), the scores arriving once, on the first output."""
    path = hf_checkpoint("llama")
    hf = hf_model(path)
    (prompt,) = _prompts([45], seed=11)
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)[:-1]
    expected = reference.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    engine = Engine(_runner(path), max_num_batched_tokens=16)  # 45 tokens: 3 chunks
    engine.add_request(_greedy(prompt, "warm"))  # fills the prefix cache with this prompt
    _drain(engine)
    scored = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    engine.add_request(EngineRequest("scored", prompt, scored))
    engine.add_request(_greedy(prompt, "cached"))
    outputs: dict[str, list] = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    first, *rest = outputs["scored"]
    scores = first.prompt_logprobs
    assert first.num_cached_tokens == 0 and outputs["cached"][0].num_cached_tokens == 40
    assert all(out.prompt_logprobs is None for out in rest + outputs["cached"])
    assert len(scores.logprobs) == len(prompt) - 1
    assert torch.tensor(scores.logprobs) == pytest.approx(expected, abs=ATOL)
    assert scores.top_ids == reference.topk(3, -1).indices.tolist()
    assert torch.tensor(scores.top_logprobs) == pytest.approx(reference.topk(3, -1).values, abs=ATOL)
    # each token's rank (vLLM's: tokens scoring as high count ahead), within what ATOL leaves open
    ahead = (reference > expected.unsqueeze(1) + ATOL).sum(-1) + 1
    tied = (reference >= expected.unsqueeze(1) - ATOL).sum(-1)
    assert len(scores.ranks) == len(prompt) - 1 and max(scores.ranks) > 1
    assert all(lo <= rank <= hi for lo, rank, hi in zip(ahead.tolist(), scores.ranks, tied.tolist()))
    # a one-token prompt has nothing to score: an empty answer, still on the first output
    engine.add_request(EngineRequest("one", prompt[:1], SamplingParams(max_tokens=1, prompt_logprobs=0)))
    (only,) = [out for out in engine.step()]
    assert only.prompt_logprobs.logprobs == only.prompt_logprobs.ranks == [] and only.prompt_logprobs.top_ids is None
    # a prompt whose KV comes from elsewhere was never run here: refused, naming the field
    with pytest.raises(RequestError) as refused:
        engine.begin_import(EngineRequest("imported", prompt, scored), [])
    assert refused.value.field == "prompt_logprobs"
