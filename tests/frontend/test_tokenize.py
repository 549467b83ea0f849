"""/tokenize and /detokenize (vLLM's endpoints): the ids a prompt is served as, and back to text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from frontend_harness import MODEL, Harness, make_recipe


@pytest.fixture(scope="module")
def server():
    with Harness(make_recipe(), [("w0", "both")]) as h:
        yield h


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_tokenize_gives_the_ids_the_workers_get(server):
    messages = [{"role": "user", "content": "how many tokens?"}]
    status, chat = _post(server, "/tokenize", {"model": MODEL, "messages": messages})
    assert status == 200 and chat["count"] == len(chat["tokens"]) and chat["max_model_len"] == 512
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10) as client:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert list(server.workers["w0"].requests[-1].prompt_token_ids) == chat["tokens"]
    assert reply.usage.prompt_tokens == chat["count"]
    status, plain = _post(server, "/tokenize", {"model": MODEL, "prompt": "héllo"})
    assert status == 200 and plain["tokens"] == list("héllo".encode())
    assert _post(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]}) == (200, {"prompt": "héllo"})


def test_lm_evals_remote_tokenizer_finds_what_it_probes_for(server):
    """lm-eval's local-completions checks GET /tokenizer_info (it needs eos_token) and POST /tokenize
    {"prompt": ..., "add_special_tokens": false} without a model; then it tokenizes on the server."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/tokenizer_info", timeout=10) as resp:
        info = json.loads(resp.read())
    assert "eos_token" in info and "chat_template" in info and info["model_max_length"] == 512
    status, probe = _post(server, "/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert status == 200 and probe["tokens"] == list(b"test")


def test_tokenizer_info_and_special_tokens_of_a_checkpoint(tmp_path):
    """A real checkpoint's tokenizer: its special tokens and template in /tokenizer_info, and BOS
    added to a completion's text prompt unless add_special_tokens is false (as vLLM)."""
    import torch

    from dyn.config.recipe import ModelSpec
    from dyn.engine.tiny import write_tiny_checkpoint
    from dyn.engine.tokenizer import Tokenizer
    from dyn.frontend.text import load_tokenizer

    torch.set_num_threads(1)
    path = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    tok, inner = load_tokenizer(ModelSpec(path=str(path), engine="torch")), Tokenizer.from_dir(path)
    info = tok.info()
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == (inner.eos_token, inner.bos_token,
                                                                             inner.chat_template)
    assert info["eos_token"] and info["chat_template"]
    from dyn.frontend.protocol import parse_completion

    assert parse_completion({"model": "m", "prompt": "x", "add_special_tokens": False}).add_special_tokens is False
    bos = inner.token_to_id(inner.bos_token)
    assert tok.encode("hello") == [bos, *tok.encode("hello", False)] and bos not in tok.encode("hello", False)


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"model": "other", "prompt": "x"}, "model"),
    ("/tokenize", {"model": MODEL, "messages": []}, "messages"),
    ("/detokenize", {"model": MODEL, "tokens": [1, -2]}, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": "abc"}, "tokens"),
    ("/detokenize", {"model": "other", "tokens": [1]}, "model"),
])
def test_bad_bodies_name_the_field(server, path, body, param):
    status, error = _post(server, path, body)
    assert status in (400, 404) and error["error"]["param"] == param
