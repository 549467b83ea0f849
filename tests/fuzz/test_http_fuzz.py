"""HTTP fuzzing of the OpenAI-compatible frontend from its OpenAPI document (schemathesis).

A live frontend (real aiohttp server, router and CURVE request plane) in
front of two in-process fake workers (tests/frontend/frontend_fakes.py)
receives 1,000+ generated requests: bodies that fit the schema (positive)
and bodies that violate it (negative), plus hand-made hostile bodies. The
contract: never a 5xx except 503 by design; every error is an OpenAI error
object; a 200 is a well-formed completion or an SSE stream ending in
[DONE]; afterwards the server still serves the openai client.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "frontend"))
from frontend_harness import MODEL, Harness, make_recipe  # noqa: E402

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "dyn" / "frontend" / "openapi.json"
# examples per (operation, mode); chat + completions give 1,000 generated requests
BUDGET = {("POST", "/v1/chat/completions"): {"positive": 300, "negative": 200},
          ("POST", "/v1/completions"): {"positive": 300, "negative": 200},
          ("POST", "/tokenize"): {"positive": 60, "negative": 40},
          ("POST", "/detokenize"): {"positive": 40, "negative": 40}}
TIMEOUT_S = 15


@pytest.fixture(scope="module")
def frontend():
    with Harness(make_recipe(max_context=256), [("w0", "both"), ("w1", "both")]) as harness:
        yield harness


@pytest.fixture(scope="module")
def schema():
    document = json.loads(SCHEMA_PATH.read_text())
    # Beam search turns one request into n x max_tokens requests (up to 10 x the context here):
    # generated at random it would take most of the budget's time; tests/frontend/test_beam_search.py has it.
    del document["components"]["schemas"]["CommonSampling"]["properties"]["use_beam_search"]
    return schemathesis.openapi.from_dict(document)


def _header(response, name: str) -> str:
    """requests and schemathesis responses spell headers differently (str vs list, case)."""
    for key, value in response.headers.items():
        if key.lower() == name.lower():
            return value[0] if isinstance(value, list) else value
    return ""


def _json(response: requests.Response, what: str):
    try:
        return response.json()
    except ValueError:
        raise AssertionError(f"{what}: status {response.status_code}, "
                             f"{_header(response, 'Content-Type')!r}, body {response.text[:300]!r}") from None


def _assert_contract(response: requests.Response, what: str) -> None:
    status = response.status_code
    assert status < 500 or status == 503, (what, status, response.text[:500])
    if status >= 400:
        body = _json(response, what)
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), (what, status, body)
        assert isinstance(error.get("message"), str) and error["message"], (what, body)
        assert isinstance(error.get("type"), str), (what, body)
        if status in (429, 503):
            assert _header(response, "Retry-After"), (what, status)
        return
    if _header(response, "Content-Type").startswith("text/event-stream"):
        events = [line for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", (what, response.text[-300:])
        for line in events[:-1]:
            json.loads(line[len("data: "):])
        return
    body = _json(response, what)
    if "choices" in body:
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), (what, body)
        assert body["usage"]["completion_tokens"] >= 0


@pytest.mark.parametrize("method,path", sorted(BUDGET))
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_5xx_and_errors_are_openai_objects(frontend, schema, method, path, mode):
    operation = schema.find_operation_by_path(method, path)
    session = requests.Session()
    base_url = f"http://127.0.0.1:{frontend.port}"
    budget = BUDGET[(method, path)][mode]
    sent: list[int] = []

    @settings(max_examples=budget, deadline=None, database=None,
              derandomize=not os.environ.get("DYN_FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)), served=st.booleans())
    def check(case, served):
        if served and isinstance(case.body, dict):
            case.body["model"] = MODEL  # half the requests get past the model check into generation
        # Sent with plain requests: schemathesis's transport stops reading SSE bodies early.
        data = case.body if isinstance(case.body, (bytes, str)) else json.dumps(case.body)
        response = session.request(method, base_url + path, data=data,
                                   headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
        sent.append(response.status_code)
        _assert_contract(response, f"{method} {path} {data[:300]!r}")

    try:
        check()
    finally:
        session.close()
    assert len(sent) >= budget, f"only {len(sent)} of {budget} requests were sent"
    if mode == "positive":
        assert 200 in sent, sorted(set(sent))  # generation really ran


@pytest.mark.parametrize("body,content_type", [
    (b"", "application/json"),
    (b"{", "application/json"),
    (b"\xff\xfe\x00", "application/json"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json"),  # nesting beyond Python's recursion limit
    (b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json"),
    (b"null", "application/json"),
    (b'"text"', "application/json"),
    (b"NaN", "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": [1e400]}', "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": [18446744073709551616]}', "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "stop_token_ids": [18446744073709551616]}',
     "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "dyn": {"expected_output_tokens": 1e300}}',
     "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "max_tokens": 1e300}', "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "top_k": 99999999999999999999999}',
     "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "application/json"),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi"}', "text/plain"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_bodies_get_openai_errors(frontend, path, body, content_type):
    response = requests.post(f"http://127.0.0.1:{frontend.port}{path}", data=body,
                             headers={"Content-Type": content_type}, timeout=TIMEOUT_S)
    _assert_contract(response, f"{path} {body[:80]!r}")


def test_unknown_routes_and_methods_are_openai_errors(frontend):
    base = f"http://127.0.0.1:{frontend.port}"
    for method, path in (("GET", "/v1/nope"), ("DELETE", "/v1/models"), ("GET", "/v1/chat/completions"),
                         ("POST", "/health"), ("GET", "/" + "a" * 5000)):
        response = requests.request(method, base + path, timeout=TIMEOUT_S)
        assert 400 <= response.status_code < 500, (method, path, response.status_code)
        _assert_contract(response, f"{method} {path[:40]}")


def test_server_still_serves_after_the_fuzzing(frontend):
    """Module-scoped server: runs after the fuzz tests above, on the same frontend."""
    assert requests.get(f"http://127.0.0.1:{frontend.port}/health", timeout=TIMEOUT_S).status_code == 200
    client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    assert all(not w.active for w in frontend.workers.values())  # no stream left open on a worker
