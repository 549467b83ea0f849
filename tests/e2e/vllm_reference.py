"""vLLM's own greedy output (and prompt logprobs and ranks) for the serving test:
`python vllm_reference.py MODEL_DIR IN.json OUT.json`.

A script, not test code: vLLM starts its workers with spawn, which needs a
real `__main__`. Each prompt runs alone (as the deployment sees them in turn)
with the engine settings of recipes/smollm2-vllm-local.yaml (the dtype is the test's). With a
`lora` adapter directory, the `lora_prompts` also run with that adapter (LoRA enabled for all).
The `beam` prompt also runs through vLLM's own beam search.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    model_dir, src, dst = sys.argv[1:4]
    from vllm import LLM, SamplingParams

    spec = json.loads(open(src).read())
    lora = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if spec.get("lora") else {}
    llm = LLM(model=model_dir, dtype=spec["dtype"], block_size=32, max_model_len=2048, enforce_eager=True,
              enable_prefix_caching=True, max_num_seqs=16, max_num_batched_tokens=512, **lora)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, detokenize=False)
    outputs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
               for p in spec["prompts"]]
    adapted = []
    if lora:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("adapter", 1, spec["lora"])
        adapted = [list(llm.generate([{"prompt_token_ids": p}], params, lora_request=request, use_tqdm=False)[0]
                        .outputs[0].token_ids) for p in spec["lora_prompts"]]
    scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    scores, ranks = {}, {}
    for idx in spec["score"]:  # each prompt token's logprob and rank (the first has none)
        prompt = spec["prompts"][idx]
        entries = llm.generate([{"prompt_token_ids": prompt}], scoring, use_tqdm=False)[0].prompt_logprobs[1:]
        scores[idx] = [entry[tok].logprob for tok, entry in zip(prompt[1:], entries)]
        ranks[idx] = [entry[tok].rank for tok, entry in zip(prompt[1:], entries)]
    from vllm.sampling_params import BeamSearchParams

    beam = spec["beam"]  # vLLM's beam search (use_beam_search): each beam's generated tokens, best first
    prompt = spec["prompts"][beam["prompt"]]
    found = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(
        beam_width=beam["width"], max_tokens=beam["max_tokens"], temperature=0.0))[0].sequences
    eos = llm.get_tokenizer().eos_token_id
    beams = [[t for t in seq.tokens[len(prompt):] if t != eos] for seq in found]
    with open(dst, "w") as f:
        json.dump({"tokens": [list(o) for o in outputs], "prompt_logprobs": scores, "prompt_ranks": ranks,
                   "lora_tokens": adapted, "beams": beams}, f)


if __name__ == "__main__":
    main()
