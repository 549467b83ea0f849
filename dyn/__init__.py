"""dyn: one command that turns a rack of GPU servers into one inference service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 10
"""Every wire frame starts with it; a peer speaking another version is refused with both numbers.
2: Finish lost its never-set `info` map (a version-1 worker's Finish would fail as an unknown field).
3: TokenChunk may carry the stream's Finish (a version-2 frontend would refuse the field).
4: a worker sends a step's chunks for one frontend in one TokenChunks frame (a version-3 frontend
   would refuse the unknown message type; every frame says 4, so a mixed pair fails on the first
   frame, naming both versions).
5: GenerateRequest.hold_s (a version-4 worker would refuse the unknown field).
6: SamplingParams gained min_p, top_logprobs and the three penalties, TokenChunk top_ids and
   top_logprobs (a version-5 peer would refuse them as unknown fields).
7: SamplingParams.prompt_logprobs and json_schema, TokenChunk.prompt_logprobs, GenerateRequest.resumed_tokens
   (completions' echo, structured output).
8: SamplingParams.logit_bias_ids, logit_bias_values and allowed_token_ids.
9: SamplingParams.bad_words_token_ids, regex and grammar.
10: PromptLogprobs.ranks (vLLM's prompt_logprobs answer gives each prompt token's rank)."""
