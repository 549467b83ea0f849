"""Fixtures of the frontend's HTTP tests: a frontend over one fake worker (frontend_fakes) and an
OpenAI client to it, one of each per module (a module defining its own fixture of the name wins)."""

from __future__ import annotations

import openai
import pytest
from frontend_harness import Harness, make_recipe


@pytest.fixture(scope="module")
def harness():
    with Harness(make_recipe(), [("w0", "both")]) as h:
        yield h


@pytest.fixture(scope="module")
def client(harness):
    with openai.OpenAI(base_url=harness.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c
