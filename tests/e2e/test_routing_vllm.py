"""Two vLLM workers behind the KV-aware router: their KV events steer requests, follow evictions,
a SIGKILLed worker's streams migrate (a structured one by a replay), and its replacement is
indexed from its own events.

Real `dyn worker` (vLLM engine) and `dyn frontend` processes under the stand-in daemon of
tests/frontend/deployment.py; one deployment for the module (a vLLM start costs ~20-40 s here).
Each worker's pool is 48 blocks of 32 tokens (engine_args num_gpu_blocks_override), so a few
long prompts put it under pressure.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("vllm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "frontend"))
from deployment import Deployment  # noqa: E402
from smollm2 import smollm2_checkpoint  # noqa: E402

pytestmark = pytest.mark.e2e
POOL_BLOCKS = 48
RECIPE = """\
name: vllm-routing
model:
  engine: vllm
  path: {path}
  name: smollm2
  dtype: float32           # a migration re-prefills prompt + streamed tokens: bf16 near-ties could
  device: cpu              # flip a greedy token there, float32 keeps the continuation identical
  block_size: 32
  max_context: 1024        # vLLM wants one max-length sequence to fit the 48-block pool
  engine_args: {{num_gpu_blocks_override: {blocks}}}
mode: aggregated
workers:
  both: {{replicas: 2, max_batch_size: 8, max_num_batched_tokens: 512, kv_memory_gib: 1, cpu_threads: 1}}
router: {{policy: kv, stall_timeout_s: 20.0, max_migrations: 3}}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return smollm2_checkpoint(tmp_path_factory)


def _indexed(url: str) -> dict[str, float]:
    """Device-tier blocks the frontend's router holds per worker."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = r'dyn_router_indexed_blocks\{tier="device",worker="([^"]+)"\} ([0-9.e+]+)'
    return {w: float(v) for w, v in re.findall(pattern, text)}


async def _complete(session, url: str, prompt: list[int] | str, n: int = 4) -> dict:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _stream(session, url: str, prompt: str, n: int, seen: list[int], **extra) -> tuple[str, int]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, **extra}
    text, migrations = [], 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            assert "error" not in chunk, chunk
            migrations = max(migrations, (chunk.get("dyn") or {}).get("migrations", 0))
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
                seen[0] += 1
    return "".join(text), migrations


def _tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 40000 + 1000 for i in range(n)]


@pytest.mark.timeout(600)
def test_kv_events_route_follow_evictions_and_survive_a_sigkill(tmp_path, model_dir):
    recipe = RECIPE.format(path=model_dir, blocks=POOL_BLOCKS)

    async def scenario():
        async with Deployment(tmp_path, recipe, ["both", "both"], ready_timeout_s=300) as dep:
            url = dep.url
            timeout = aiohttp.ClientTimeout(total=180)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # 1. A long shared prefix: every follow-up lands on the worker that holds it.
                prefix = _tokens(1, 320)  # 10 blocks
                await _complete(session, url, prefix)
                await dep.until(lambda: max(_indexed(url).values(), default=0) >= 10, 10, "the prefix indexed")
                holder = max(_indexed(url).items(), key=lambda kv: kv[1])[0]
                for k in range(4):
                    got = await _complete(session, url, prefix + _tokens(100 + k, 40))
                    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= 320, got["usage"]
                counts = _indexed(url)
                assert counts[holder] >= 10

                # 2. Pressure: 10 distinct 600-token prompts (180 blocks) through two 48-block pools
                # (all at once: each worker prefills what fits and queues the rest).
                await asyncio.gather(*(_complete(session, url, _tokens(1000 + k, 600), n=1) for k in range(10)))
                await asyncio.sleep(0.5)
                counts = _indexed(url)
                assert all(v <= POOL_BLOCKS for v in counts.values()), counts  # evictions reached the index
                assert sum(counts.values()) >= POOL_BLOCKS  # and the index is not simply empty

                # 3. SIGKILL the worker carrying most streams: they finish on the other one, unchanged.
                prompts = [f"Write a long story about a {animal} who learns to sail." for animal in
                           ("cat", "dog", "fox", "owl")]
                # (the references run together, as the streams under test will)
                texts = await asyncio.gather(*(_stream(session, url, p, 60, [0]) for p in prompts))
                reference = {p: text for p, (text, _) in zip(prompts, texts)}
                seen = [[0] for _ in prompts]
                tasks = [asyncio.create_task(_stream(session, url, p, 60, c)) for p, c in zip(prompts, seen)]
                await dep.until(lambda: all(c[0] >= 3 for c in seen) or any(t.done() for t in tasks), 120,
                                "every stream to start")
                busy = {w: v["in_flight"] for w, v in dep.health()["workers"].items() if v["state"] == "ready"}
                victim = max(busy, key=busy.get)
                await dep.kill(victim)
                results = await asyncio.gather(*tasks)
                for p, (text, migrations) in zip(prompts, results):
                    assert text == reference[p], (p, migrations)
                assert any(m > 0 for _, m in results)

                # 4. The replacement (a new process: new KV-event epoch) is indexed from scratch.
                await dep.until(lambda: dep.num_ready() >= 2, 240, "the replacement ready")
                await dep.until(lambda: len([w for w, v in dep.health()["workers"].items()
                                             if v["state"] == "ready"]) >= 2, 20, "the frontend to see it")
                fresh = [w for w in dep.health()["workers"] if w not in counts]
                assert fresh, "no replacement worker"
                for k in range(6):  # the router spreads fresh prefixes; the newcomer gets some
                    await _complete(session, url, _tokens(5000 + k, 200), n=1)
                await dep.until(lambda: _indexed(url).get(fresh[0], 0) > 0, 10, "the replacement's blocks indexed")

                # 5. A structured stream (vLLM's grammar cannot resume mid-answer) whose worker is
                # SIGKILLed: the greedy request is replayed on the other worker from its prompt, the
                # tokens already sent are checked and dropped, and the text is the same.
                regex = {"guided_regex": "[A-Za-z ,.']{40,400}"}
                story = "Write a long story about a whale who learns to sing."
                reference_text, _ = await _stream(session, url, story, 50, [0], **regex)
                assert re.fullmatch(regex["guided_regex"], reference_text), reference_text
                seen = [0]
                task = asyncio.create_task(_stream(session, url, story, 50, seen, **regex))
                await dep.until(lambda: seen[0] >= 5 or task.done(), 60, "the structured stream to start")
                carrying = [w for w, v in dep.health()["workers"].items() if v["in_flight"]]
                assert len(carrying) == 1 and not task.done(), carrying
                await dep.kill(carrying[0])
                text, migrations = await task
                assert migrations > 0 and text == reference_text

    asyncio.run(scenario())
