"""Agent hints through the HTTP API, against real mock engines (dyn.bench.local_cluster).

Each test shows a hint's effect, not only that it is accepted: cache hits on the next
turn, blocks surviving pressure, a closed session losing its protection, order of service.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from dyn.bench.local_cluster import LocalCluster
from dyn.config.recipe import KvTiersSpec, MockTiming, ModelSpec, Recipe, RouterSpec, WorkerGroup

BS = 4


def _recipe(num_kv_blocks: int, *, max_batch_size: int = 8, step_s: float = 0.0) -> Recipe:
    timing = MockTiming(prefill_base_s=step_s, prefill_s_per_token=0.0, decode_base_s=step_s,
                        decode_s_per_seq=0.0, num_kv_blocks=num_kv_blocks)
    return Recipe(name="hints", model=ModelSpec(path="/nonexistent/mock", engine="mock", block_size=BS,
                                                max_context=512, mock=timing),
                  workers=(WorkerGroup("both", max_batch_size=max_batch_size),),
                  router=RouterSpec(admission=False), kv_tiers=KvTiersSpec(retention_ttl_s=None))


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _complete(cluster, prompt: list[int], n: int = 4, **ext) -> dict:
    status, body = _post(cluster.base_url, {"model": "mock", "prompt": prompt, "max_tokens": n,
                                            "temperature": 0, **ext})
    assert status == 200, body
    cluster.call(cluster.frontend.dispatcher.agent.wait_idle)
    return body


def _cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _greedy(prompt: list[int], n: int) -> list[int]:
    """The mock engine's output depends only on the context: a fresh engine gives the ids the
    served one streamed (the byte tokenizer cannot map text back to them)."""
    from dyn.engine.backend import EngineRequest, SamplingParams
    from dyn.engine.mock import MockEngine

    engine = MockEngine(MockTiming(), block_size=BS, max_context=512, clock="virtual")
    engine.add_request(EngineRequest("g", list(prompt), SamplingParams(max_tokens=n, ignore_eos=True)))
    out: list[int] = []
    while engine.has_work():
        for o in engine.step():
            out += o.token_ids
    return out


@pytest.fixture(scope="module")
def two_workers():
    with LocalCluster(_recipe(num_kv_blocks=64), num_workers=2) as cluster:
        yield cluster


def _metric(cluster, name: str) -> str:
    with urllib.request.urlopen(cluster.base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        return "\n".join(line for line in r.read().decode().splitlines() if line.startswith(name))


def test_nvext_hints_accepted_unknown_counted_wrong_type_named(two_workers):
    c = two_workers
    body = {"nvext": {"agent_hints": {"priority": 1, "osl": 8, "speculative_prefill": False,
                                      "latency_sensitivity": 1.2, "future_hint": 3},
                      "session_control": {"session_id": "s-nv", "action": "bind", "timeout_seconds": 60}},
            "dyn": {"retention": {"priority": 2, "ttl_s": 30, "colour": "red"}}}
    _complete(c, list(range(10, 30)), **body)
    # osl reaches the planner through the frontend heartbeat (its decode demand)
    from dyn.frontend.process import _heartbeat_metrics
    beat = c.call(_heartbeat_metrics, c.frontend)
    assert beat["osl_requests_total"] == 1 and beat["osl_tokens_total"] == 8
    assert 'field="nvext.agent_hints.future_hint"} 1.0' in _metric(c, "dyn_frontend_unknown_hint_fields")
    assert 'field="dyn.retention.colour"} 1.0' in _metric(c, "dyn_frontend_unknown_hint_fields")
    status, err = _post(c.base_url, {"model": "mock", "prompt": [1, 2, 3],
                                     "nvext": {"agent_hints": {"osl": "long"}}})
    assert status == 400 and err["error"]["param"] == "nvext.agent_hints.osl"
    status, err = _post(c.base_url, {"model": "mock", "prompt": [1, 2, 3],
                                     "dyn": {"retention": {"ttl_s": -1}}})
    assert status == 400 and err["error"]["param"] == "dyn.retention.ttl_s"


def test_session_header_keeps_turns_on_one_worker(two_workers):
    c = two_workers
    workers = set()
    for turn in range(4):
        prompt = [7] * 8 + [100 + turn] * 8  # little shared prefix: only affinity keeps them together
        status, _ = _post(c.base_url, {"model": "mock", "prompt": prompt, "max_tokens": 2},
                          {"X-Dynamo-Session-ID": "agent-42"})
        assert status == 200
        workers.add(c.frontend.dispatcher.routing.router._session_worker("agent-42", time.monotonic()))
    assert len(workers) == 1 and None not in workers


def test_speculative_prefill_makes_next_turn_prefix_a_cache_hit(two_workers):
    c = two_workers
    results = {}
    for label, speculate in (("plain", False), ("spec", True)):
        base = 200 if speculate else 300
        turn1 = [base + i for i in range(21)]
        _complete(c, turn1, n=11, dyn={"session_id": f"s-{label}", "speculative_prefill": speculate})
        out_ids = _greedy(turn1, 11)
        turn2 = turn1 + out_ids + [base + 50 + i for i in range(6)]
        second = _complete(c, turn2, n=2, dyn={"session_id": f"s-{label}"})
        results[label] = (_cached(second), len(turn1) + len(out_ids))
    plain_cached, prefix_len = results["plain"]
    spec_cached, _ = results["spec"]
    # Without it, the decode KV covers all but the last sampled token (never fed back);
    # with it, every full block of prompt + answer is cached before the next turn arrives.
    assert plain_cached == ((prefix_len - 1) // BS) * BS
    assert spec_cached == (prefix_len // BS) * BS > plain_cached
    assert 'outcome="done"} 1.0' in _metric(c, "dyn_frontend_speculative_prefills")


def test_retention_keeps_blocks_under_pressure_and_closing_the_session_releases_them():
    with LocalCluster(_recipe(num_kv_blocks=24), num_workers=1) as c:
        kept, plain = [500 + i for i in range(33)], [600 + i for i in range(33)]
        _complete(c, kept, n=2, dyn={"session_id": "keep", "retention": {"priority": 5}})
        _complete(c, plain, n=2)

        def flood(seed: int) -> None:
            for k in range(4):  # 4 x 9 blocks through a 24-block pool
                _complete(c, [seed + 40 * k + i for i in range(33)], n=2)

        flood(1000)
        assert _cached(_complete(c, kept, n=2, dyn={"session_id": "keep"})) == 32
        assert _cached(_complete(c, plain, n=2)) == 0
        _complete(c, kept, n=2, dyn={"session_id": "keep", "close_session": True})
        flood(3000)
        assert _cached(_complete(c, kept, n=2)) == 0  # released: evicted like any block


def test_priority_orders_service_on_a_busy_worker():
    with LocalCluster(_recipe(num_kv_blocks=256, max_batch_size=1, step_s=0.01), num_workers=1) as c:
        done: list[str] = []

        def send(name: str, priority: int) -> None:
            _post(c.base_url, {"model": "mock", "prompt": [9, 9, 9, 9], "max_tokens": 20,
                               "dyn": {"priority": priority}})
            done.append(name)

        threads = [threading.Thread(target=send, args=(f"low{i}", 0)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        high = threading.Thread(target=send, args=("high", 10))
        high.start()
        for t in threads + [high]:
            t.join(30)
        # The first low request was running; the high one overtakes the queued ones.
        assert done.index("high") <= 1, done


def test_host_tier_expiry_reaches_the_router_and_a_reoffload_is_served_again():
    """Regression (issue 14): expired host blocks stayed in the router's index as host hits."""
    from dataclasses import replace

    from dyn.kv.hashing import hash_blocks

    recipe = replace(_recipe(num_kv_blocks=12), kv_tiers=KvTiersSpec(ttl_s=0.5, retention_ttl_s=None))
    with LocalCluster(recipe, num_workers=1, host_tier_blocks=64, expiry_sweep_s=0.1) as c:
        router = c.frontend.dispatcher.routing.router
        prompt = [700 + i for i in range(33)]
        hashes = hash_blocks(prompt, BS, 0)

        def host_hits() -> int:
            return router.index.find(hashes).host_hits.get("worker-0", 0)

        def until(pred, what: str) -> None:
            deadline = time.monotonic() + 5
            while not pred():
                assert time.monotonic() < deadline, what
                time.sleep(0.02)

        _complete(c, prompt, n=2)
        _complete(c, [800 + i for i in range(33)], n=2)  # 12-block pool: the first prompt moves to host
        until(lambda: host_hits() > 0, "the router to see the offloaded blocks")
        until(lambda: host_hits() == 0, "the sweep's removal events after the TTL")
        # Served from host again once re-offloaded: the stale entry is replaced, not merely touched.
        _complete(c, prompt, n=2)
        _complete(c, [900 + i for i in range(33)], n=2)
        until(lambda: host_hits() > 0, "the re-offloaded blocks")
        assert _cached(_complete(c, prompt, n=2)) > 0


def _chat(cluster, messages: list[dict], n: int, **ext) -> dict:
    req = urllib.request.Request(cluster.base_url + "/chat/completions", json.dumps(
        {"model": "mock", "messages": messages, "max_tokens": n, "temperature": 0, **ext}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    cluster.call(cluster.frontend.dispatcher.agent.wait_idle)
    return body


def test_chat_speculative_prefill_caches_the_templated_conversation(two_workers):
    """The next chat turn re-renders the answer as text inside the template: the decode KV's ids
    are not what it repeats, the speculative prefill of the templated conversation is."""
    c = two_workers
    cached, first_prompt = {}, {}
    tok = c.frontend.tokenizer
    for speculate in (False, True):
        tag = "spec" if speculate else "plain"
        history = [{"role": "system", "content": f"You are agent {tag}. " * 4},
                   {"role": "user", "content": "List the files. " * 3}]
        first = _chat(c, history, 12, dyn={"session_id": f"chat-{tag}", "speculative_prefill": speculate})
        history += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "Now open the first one."}]
        second = _chat(c, history, 2, dyn={"session_id": f"chat-{tag}"})
        cached[tag] = _cached(second)
        first_prompt[tag] = len(tok.chat_prompt(history[:2]))
    spec_ids, next_ids = tok.chat_prompt(history[:3]), tok.chat_prompt(history)
    common = next(i for i, (a, b) in enumerate(zip(spec_ids, next_ids)) if a != b)
    assert cached["spec"] == common // BS * BS
    # without it only the system + user prompt was cached (the mock's answer ids re-tokenize apart)
    assert cached["plain"] <= first_prompt["plain"] and first_prompt["spec"] < cached["spec"]


def test_priority_gets_admission_slack_under_the_ttft_target():
    from dataclasses import replace

    from dyn.config.recipe import PlannerSpec

    recipe = _recipe(num_kv_blocks=64)
    timing = replace(recipe.model.mock, prefill_base_s=0.002, prefill_s_per_token=0.0001)
    recipe = replace(recipe, model=replace(recipe.model, mock=timing), router=RouterSpec(admission=True),
                     planner=PlannerSpec(ttft_ms=5.0))
    with LocalCluster(recipe, num_workers=1) as c:
        prompt = [40 + i for i in range(40)]  # modelled prefill ~6 ms: over 5 ms, under 2 x 5 ms
        low, body = _post(c.base_url, {"model": "mock", "prompt": prompt, "max_tokens": 2})
        assert low == 429 and body["error"]["code"] == "ttft_target_exceeded"
        high, _ = _post(c.base_url, {"model": "mock", "prompt": prompt, "max_tokens": 2,
                                     "nvext": {"agent_hints": {"priority": -1}}})  # vLLM convention
        assert high == 200


def test_priority_request_preempts_a_low_priority_one_when_the_pool_is_full():
    with LocalCluster(_recipe(num_kv_blocks=28, step_s=0.01), num_workers=1) as c:
        done: list[str] = []

        def send(name: str, prompt: list[int], n: int, priority: int) -> None:
            status, _ = _post(c.base_url, {"model": "mock", "prompt": prompt, "max_tokens": n,
                                           "dyn": {"priority": priority, "ignore_eos": True}})
            assert status == 200
            done.append(name)

        low = threading.Thread(target=send, args=("low", [11] * 60, 48, 0))
        low.start()
        # wait (bounded) until the low request holds ~22 of 28 blocks and keeps growing: the high
        # one's prompt no longer fits beside it, so the scheduler must preempt a victim
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = c.on_engine("worker-0", lambda e: e.stats())
            if stats.num_running == 1 and stats.num_kv_blocks_used >= 22:
                break
            time.sleep(0.01)
        assert stats.num_running == 1, "the low request finished before the high one came"
        send("high", [12] * 20, 8, 5)
        low.join(30)
        stats = c.on_engine("worker-0", lambda e: e.stats())
        assert done == ["high", "low"] and stats.num_preemptions >= 1
