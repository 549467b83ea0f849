"""Admission: TTFT estimate from the engine profile, 429 + Retry-After, priority first."""

from __future__ import annotations

import dataclasses

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.config.recipe import MockTiming, PlannerSpec
from dyn.engine.profile import mock_profile
from dyn.frontend.admission import Admission
from dyn.frontend.protocol import ApiError

TIMING = MockTiming(prefill_base_s=0.002, prefill_s_per_token=0.001)


def _recipe(admission: bool = True):
    recipe = make_recipe()
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, mock=TIMING),
                               planner=PlannerSpec(ttft_ms=100.0),
                               router=dataclasses.replace(recipe.router, admission=admission))


def test_estimate_is_queue_plus_own_prefill():
    admission = Admission(mock_profile(_recipe()), 0.1)
    est = admission.estimate("both", waiting_tokens=1000, uncached_tokens=100)
    per_token = (0.002 + 0.001 * 2048) / 2048
    assert est.queue_s == pytest.approx(1000 * per_token)
    assert est.own_s == pytest.approx(0.002 + 0.1)
    assert admission.check("w0", "both", 0, 50, priority=0).ttft_s < 0.1
    with pytest.raises(ApiError) as err:
        admission.check("w0", "both", 120, 20, priority=0)
    assert err.value.status == 429 and err.value.retry_after_s >= 1
    assert "w0" in err.value.message and "120 prompt tokens queued" in err.value.message
    assert admission.check("w0", "both", 120, 20, priority=1).ttft_s > 0.1  # up to 2x for priority
    with pytest.raises(ApiError):
        admission.check("w0", "both", 400, 20, priority=5)


def test_http_429_with_retry_after_and_priority_admitted_first():
    with Harness(_recipe(), [("w0", "both")]) as h:
        h.call(lambda: h.pool.workers["w0"].metrics.update(waiting_prefill_tokens=120))
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
            with pytest.raises(openai.RateLimitError) as err:
                c.completions.create(model=MODEL, prompt="x" * 20, max_tokens=2)
            assert err.value.response.headers["Retry-After"] == "1"
            assert err.value.body["code"] == "ttft_target_exceeded"
            out = c.completions.create(model=MODEL, prompt="x" * 20, max_tokens=2, extra_body={"dyn": {"priority": 1}})
            assert out.usage.completion_tokens == 2
        assert len(h.workers["w0"].requests) == 1  # the refused request never reached the worker


def test_admission_switched_off_in_the_recipe_queues_instead():
    with Harness(_recipe(admission=False), [("w0", "both")]) as h:
        h.call(lambda: h.pool.workers["w0"].metrics.update(waiting_prefill_tokens=100_000))
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
            assert c.completions.create(model=MODEL, prompt="x" * 20, max_tokens=2).usage.completion_tokens == 2
