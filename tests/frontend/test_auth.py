"""Bearer-token auth from a hashed keys file."""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.config.recipe import AuthSpec
from dyn.errors import ConfigError
from dyn.frontend.auth import Tenant, hash_api_key, load_api_keys, tenant_salt
from dyn.frontend.protocol import ApiError
from dyn.frontend.ratelimit import RateLimiter


def test_keys_file_is_validated(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# ops team\n{hash_api_key('s3cret')}\n\nplaintext-key\n")
    with pytest.raises(ConfigError) as err:
        load_api_keys(path)
    assert err.value.line == 4 and str(path) in str(err.value)
    with pytest.raises(ConfigError):
        load_api_keys(tmp_path / "missing")
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no keys"):
        load_api_keys(path)


def test_requests_need_a_listed_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text(hash_api_key("s3cret") + "\n")
    recipe = dataclasses.replace(make_recipe(), auth=AuthSpec(api_keys_file=str(path)))
    with Harness(recipe, [("w0", "both")]) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="wrong", max_retries=0, timeout=10) as c:
            with pytest.raises(openai.AuthenticationError) as err:
                c.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert err.value.body["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=h.base_url, api_key="s3cret", max_retries=0, timeout=10) as c:
            assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{h.port}/health") as r:  # probes need no key
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:  # the tokenizer works for tenants only
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{h.port}/tokenize", data=b'{"model": "%s", "prompt": "x"}' % MODEL.encode(),
                headers={"content-type": "application/json"}))
        assert refused.value.code == 401


def test_keys_file_maps_keys_to_tenants_with_rates(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{hash_api_key('a1')} acme 5\n{hash_api_key('a2')} acme\n{hash_api_key('b')} beta\n"
                    f"{hash_api_key('legacy')}\n")
    keys = load_api_keys(path)
    assert keys.authenticate("Bearer a2") == Tenant("acme", 5.0)
    assert keys.authenticate("Bearer b") == Tenant("beta", None)
    assert keys.authenticate("Bearer legacy") == Tenant("default", None)
    assert keys.authenticate("Bearer nope") is None and keys.authenticate(None) is None
    assert keys.authenticate("Basic a1") is None
    for bad, what in ((f"{hash_api_key('x')} bad/name", "bad tenant name"),
                      (f"{hash_api_key('x')} t -1", "rate_rps must be a positive"),
                      (f"{hash_api_key('x')} t 1 extra", "at most 3 fields"),
                      (f"{hash_api_key('x')} t 1\n{hash_api_key('y')} t 2", "rate 2")):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=what):
            load_api_keys(path)


def test_tenant_salts_are_stable_distinct_and_63_bit():
    assert tenant_salt("acme") == tenant_salt("acme") != tenant_salt("beta")
    assert all(0 < tenant_salt(n) < 2**63 for n in ("acme", "beta", "default"))


def test_rate_limit_is_a_token_bucket_per_tenant():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    slow, other = Tenant("slow", 2.0), Tenant("other", None)
    limiter.check(slow)
    limiter.check(slow)  # burst of 2
    with pytest.raises(ApiError) as err:
        limiter.check(slow)
    assert err.value.status == 429 and err.value.retry_after_s == 1 and "'slow'" in err.value.message
    limiter.check(other)  # unlimited tenants never wait
    now[0] += 0.5  # refills one token
    limiter.check(slow)
    assert limiter.num_limited == {"slow": 1}


def _keys_recipe(tmp_path, share: bool = False):
    path = tmp_path / "keys"
    path.write_text(f"{hash_api_key('ka')} acme\n{hash_api_key('kb')} beta 1\n")
    return dataclasses.replace(make_recipe(), auth=AuthSpec(api_keys_file=str(path),
                                                            share_cache_across_tenants=share))


def test_tenants_get_their_own_salt_and_rate_limit_over_http(tmp_path):
    with Harness(_keys_recipe(tmp_path), [("w0", "both")]) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="ka", max_retries=0, timeout=10) as a, \
                openai.OpenAI(base_url=h.base_url, api_key="kb", max_retries=0, timeout=10) as b:
            a.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)
            a.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)
            b.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)
            with pytest.raises(openai.RateLimitError) as err:
                b.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)
            assert err.value.body["code"] == "rate_limit_exceeded" and err.value.response.headers["Retry-After"]
            a.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)  # acme is not limited
        no_key = urllib.request.Request(f"{h.base_url}/completions", method="POST",
                                        data=b'{"model": "%s", "prompt": "x"}' % MODEL.encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(no_key, timeout=10)
        assert err.value.code == 401 and b"invalid_api_key" in err.value.read()
        salts = [r.salt for r in h.workers["w0"].requests]
        assert salts == [tenant_salt("acme")] * 2 + [tenant_salt("beta"), tenant_salt("acme")]
    with Harness(_keys_recipe(tmp_path, share=True), [("w0", "both")]) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="kb", max_retries=0, timeout=10) as b:
            b.completions.create(model=MODEL, prompt="same prompt", max_tokens=1)
        assert h.workers["w0"].requests[0].salt == 0
