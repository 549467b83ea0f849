"""Two tenants, one worker process, the same prompt: no shared prefix-cache hits (salted blocks)."""

from __future__ import annotations

import asyncio

import openai
import pytest
from deployment import Deployment

from dyn.frontend.auth import hash_api_key

RECIPE = """\
name: tenants
model:
  engine: mock
  name: mock-llama
  block_size: 16
  max_context: 2048
  mock: {{prefill_base_s: 0.0, prefill_s_per_token: 0.0, decode_base_s: 0.001, decode_s_per_seq: 0.0}}
mode: aggregated
workers:
  both: {{replicas: 1}}
auth: {{api_keys_file: {keys}, share_cache_across_tenants: {share}}}
"""
PROMPT = "the shared system prompt that both tenants happen to send, word for word. " * 2


async def _cached(url: str, key: str) -> int:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10) as c:
        out = await c.completions.create(model="mock-llama", prompt=PROMPT, max_tokens=2)
        return out.usage.prompt_tokens_details.cached_tokens


@pytest.mark.timeout(60)
@pytest.mark.parametrize("share", [False, True])
def test_identical_prompts_of_two_tenants_share_no_cache(tmp_path, share):
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_api_key('key-a')} acme\n{hash_api_key('key-b')} beta\n")

    async def scenario():
        recipe = RECIPE.format(keys=keys, share=str(share).lower())
        async with Deployment(tmp_path, recipe, ["both"], relaunch=False) as dep:
            assert await _cached(dep.url, "key-a") == 0
            assert await _cached(dep.url, "key-a") >= 64  # the tenant's own repeat hits its cache
            beta = await _cached(dep.url, "key-b")
            if share:
                assert beta >= 64
            else:
                assert beta == 0
                assert await _cached(dep.url, "key-b") >= 64
    asyncio.run(scenario())
