"""Bearer-token auth from a hashed keys file."""

from __future__ import annotations

import dataclasses
import urllib.request

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe

from dyn.config.recipe import AuthSpec
from dyn.errors import ConfigError
from dyn.frontend.auth import hash_api_key, load_api_keys


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
