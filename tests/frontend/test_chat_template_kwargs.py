"""chat_template_kwargs over HTTP: the worker gets the prompt the template renders with them, and
a value the template cannot use is the client's 400, naming the field."""

from __future__ import annotations

import json
from dataclasses import replace

import openai
import pytest
from frontend_harness import Harness, make_recipe

from dyn.engine.tiny import write_tiny_checkpoint
from dyn.engine.tokenizer import Tokenizer

TEMPLATE = ("{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}{%- endfor %}<|assistant|>"
            "{%- if enable_thinking is defined and enable_thinking is false %}<think></think>{%- endif %}"
            "{%- if budget is defined %} budget {{ budget + 1 }}{%- endif %}")


def test_kwargs_shape_the_prompt_the_worker_gets(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    tok = Tokenizer.from_dir(model)
    base = make_recipe()
    recipe = replace(base, model=replace(base.model, path=str(model), name="tiny"))
    messages = [{"role": "user", "content": "hi"}]
    with Harness(recipe, [("w0", "both")]) as h, \
            openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as client:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                           extra_body={"chat_template_kwargs": {"budget": "lots"}})
        plain, no_thinking = (r.prompt_token_ids for r in h.workers["w0"].requests)
    assert list(plain) == tok.encode("<|user|>hi<|assistant|>", add_special_tokens=False)
    assert list(no_thinking) == tok.encode("<|user|>hi<|assistant|><think></think>", add_special_tokens=False)
    assert err.value.body["param"] == "chat_template_kwargs"
