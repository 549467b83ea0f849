"""SIGKILL a decode worker mid-stream: every stream completes, token for token as without the kill.

Real `dyn worker` and `dyn frontend` processes under a stand-in daemon that
reports the dead worker and relaunches it (tests/frontend/deployment.py).
The mock engine's tokens depend on the KV bytes it holds, so a migration that
lost or garbled context would change the output; the torch engine runs the
tiny random Llama checkpoint. Output is compared with the same prompt served
undisturbed on the same deployment (greedy, ignore_eos).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "frontend"))
from deployment import Deployment  # noqa: E402

pytestmark = pytest.mark.e2e

MOCK_RECIPE = """\
name: migrate-mock
model:
  engine: mock
  name: mock-llama
  block_size: 4
  max_context: 1024
  mock: {prefill_base_s: 0.001, prefill_s_per_token: 0.00001, decode_base_s: 0.008, decode_s_per_seq: 0.0}
mode: aggregated
workers:
  both: {replicas: 2}
router: {stall_timeout_s: 3.0, max_migrations: 3}
"""

TORCH_RECIPE = """\
name: migrate-torch
model:
  engine: torch
  path: {path}
  name: tiny
  dtype: float32
  device: cpu
  block_size: 4
  max_context: 256
mode: aggregated
workers:
  both: {{replicas: 2, max_batch_size: 4, max_num_batched_tokens: 128, cpu_threads: 1}}
router: {{stall_timeout_s: 5.0}}
"""


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str, n: int,
                  seen: list[int]) -> tuple[str, int, str | None]:
    """(text, migrations, finish_reason) of one streamed completion; `seen` counts chunks so far."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, migrations, reason = [], 0, None
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
                reason = chunk["choices"][0]["finish_reason"] or reason
                seen[0] += 1
    return "".join(text), migrations, reason


async def _trials(dep: Deployment, model: str, prompts: list[str], n: int, want: int,
                  max_rounds: int) -> list[tuple[str, str, int]]:
    """Rounds of concurrent streams; in each, SIGKILL the worker with the most of them."""
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        reference = {}
        for p in prompts:
            reference[p], _, _ = await _stream(session, dep.url, model, p, n, [0])
        results: list[tuple[str, str, int]] = []
        for _ in range(max_rounds):
            if sum(m > 0 for _, _, m in results) >= want:
                break
            await dep.until(lambda: dep.num_ready() >= 2, 60, "two ready workers")
            await dep.until(lambda: sum(w["state"] == "ready" for w in dep.health()["workers"].values()) >= 2,
                            10, "the frontend to see two ready workers")
            counters = [[0] for _ in prompts]
            tasks = [asyncio.create_task(_stream(session, dep.url, model, p, n, c))
                     for p, c in zip(prompts, counters)]
            await dep.until(lambda: all(c[0] >= 3 for c in counters) or any(t.done() for t in tasks), 60,
                            "every stream to start")
            busy = {wid: w["in_flight"] for wid, w in dep.health()["workers"].items() if w["state"] == "ready"}
            await dep.kill(max(busy, key=busy.get))
            for p, (text, migrations, reason) in zip(prompts, await asyncio.gather(*tasks)):
                assert reason == "length"
                results.append((p, text, migrations))
        for p, text, migrations in results:
            assert text == reference[p], (p, migrations, text, reference[p])
        return results


@pytest.mark.timeout(90)
def test_sigkill_mid_stream_mock_engine_18_trials(tmp_path):
    async def scenario():
        async with Deployment(tmp_path, MOCK_RECIPE, ["both", "both"]) as dep:
            prompts = [f"request {i} asks for a long and careful answer" for i in range(6)]
            results = await _trials(dep, "mock-llama", prompts, 80, want=18, max_rounds=10)
            migrated = sum(m > 0 for _, _, m in results)
            assert migrated >= 18, f"only {migrated} streams were on a killed worker"
            assert all(m <= 1 for _, _, m in results)  # straight to a live worker, no second hop
            lines = [json.loads(x) for x in (dep.tmp / "frontend.log").read_text().splitlines()
                     if x.startswith("{")]
            assert any(x.get("msg", "").startswith("request migrating") for x in lines)
    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_torch_engine_2_trials(tmp_path):
    from dyn.engine.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)

    async def scenario():
        async with Deployment(tmp_path, TORCH_RECIPE.format(path=ckpt), ["both", "both"]) as dep:
            prompts = ["the quick brown fox", "jumps over the lazy dog", "pack my box", "with five dozen"]
            results = await _trials(dep, "tiny", prompts, 160, want=2, max_rounds=4)
            assert sum(m > 0 for _, _, m in results) >= 2
    asyncio.run(scenario())
