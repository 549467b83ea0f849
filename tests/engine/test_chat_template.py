"""Chat templates render as transformers renders them (the environment vLLM's server uses too):
today's date from strftime_now, loop controls, tojson as transformers defines it, generation blocks."""

from __future__ import annotations

import json

import pytest

from dyn.engine.chat_template import compile_chat_template
from dyn.engine.loader import CheckpointError
from dyn.engine.tiny import write_tiny_checkpoint
from dyn.engine.tokenizer import Tokenizer
from dyn.errors import RequestError

# Written for this test, in the idioms real templates use (Llama 3.2's date header, Qwen's last
# user turn found with a loop that breaks, tool schemas through tojson, training masks).
TEMPLATE = """{%- if strftime_now is defined %}{%- set today = strftime_now("%d %b %Y") %}{%- else %}\
{%- set today = "26 Jul 2024" %}{%- endif %}
{{- bos_token }}<|system|>Today Date: {{ today }}
{%- if tools is defined and tools %} Tools: {{ tools | tojson(indent=2) }}{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages | reverse %}
{%- if message.role == "user" %}{%- set ns.last_user = messages | length - 1 - loop.index0 %}{% break %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == "system" %}{% continue %}{%- endif %}
<|{{ message.role }}|>{%- if message.role == "assistant" %}{% generation %}{{ message.content }}{% endgeneration %}
{%- else %}{{ message.content | tojson }}{%- endif %}{%- if loop.index0 == ns.last_user %} (last user turn){%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{%- endif %}"""

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "Größe <b> & 'x' 日本"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"}]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "naïve <tool>"}}]


def _reference(template: str, **kwargs) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    return utils._compile_jinja_template(template).render(**kwargs)


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_renders_as_transformers_does(tools):
    kwargs = dict(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", tools=tools)
    ours = compile_chat_template(TEMPLATE, "model").render(**kwargs)
    assert ours == _reference(TEMPLATE, **kwargs)
    assert "26 Jul 2024" not in ours  # today's date, as under vLLM
    assert json.dumps("Größe <b> & 'x' 日本", ensure_ascii=False) in ours  # not HTML-escaped
    assert ours.count("(last user turn)") == 1 and "again\" (last user turn)" in ours


def test_a_checkpoints_template_uses_them_through_the_tokenizer(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    prompt = Tokenizer.from_dir(model).apply_chat_template(MESSAGES)
    assert prompt.endswith("<|assistant|>") and "(last user turn)" in prompt


def test_a_template_that_does_not_compile_names_the_file_and_one_that_refuses_names_the_messages(tmp_path):
    with pytest.raises(CheckpointError, match="model/tokenizer_config.json: chat_template does not compile"):
        compile_chat_template("{% for m in messages %}", "model")
    model = write_tiny_checkpoint(tmp_path / "tiny", num_layers=1, hidden_size=32)
    config = json.loads((model / "tokenizer_config.json").read_text())
    refusing = "{{ raise_exception('only user turns') if messages[0].role != 'user' else 'ok' }}"
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": refusing}))
    with pytest.raises(RequestError, match="only user turns"):
        Tokenizer.from_dir(model).apply_chat_template(MESSAGES)

