"""Chat templates compiled in the environment they are written for: transformers'.

A checkpoint's chat template is Jinja written against what transformers' `apply_chat_template`
provides (vLLM's server renders through it too), and templates use more than plain Jinja:
`strftime_now` (Llama 3.2 writes today's date into the system header; Mistral's templates
need it), `{% break %}`/`{% continue %}` (Jinja's loop-controls extension), `tojson` that keeps
non-ASCII and `<>&'` as they are (Jinja's own escapes them for HTML) and takes `indent`, and
`{% generation %}` blocks (marking assistant text for training masks: rendered as their body).
Without them a template fails to compile, a chat request fails, or, worse, the prompt differs
from the one the model sees under vLLM (a date fallback taken where `strftime_now` is missing).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

from jinja2 import Template, TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dyn.engine.loader import CheckpointError


RENDER_ARGUMENTS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "documents"})
"""What dyn passes to every render: a request's chat_template_kwargs may not replace them."""
GLOBALS = frozenset({"raise_exception", "strftime_now", "range", "dict", "lipsum", "cycler", "joiner", "namespace"})
"""The environment's functions (Jinja's own and transformers'): a kwarg of the same name would
shadow one, and a template calling it would fail."""


def compile_chat_template(source_text: str, where: str) -> Template:
    """The compiled template; CheckpointError naming `where` if it does not compile."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        template = env.from_string(source_text)
    except TemplateError as exc:
        raise CheckpointError(f"chat_template does not compile: {exc}", path=f"{where}/tokenizer_config.json") \
            from None
    # Jinja keeps a template's globals as a ChainMap over the environment's and copies them into a
    # dict on every render: 8 us of a 14 us render here, once per chat request. Nothing changes
    # them after this, so one plain dict renders the same.
    template.globals = dict(template.globals)
    return template


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: the body, as written."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
