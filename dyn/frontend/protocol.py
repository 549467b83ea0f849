"""OpenAI request bodies -> frozen dataclasses, with errors that name the field.

Validation is hand-written instead of pydantic: the hot path parses one small
dict per request, and every failure must carry the OpenAI `param` name. Unknown
fields are ignored, as OpenAI-compatible servers do; known fields we cannot
honour (best_of > 1, non-text content) are refused, never ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from dyn.config.recipe import MAX_REPETITION_PENALTY
from dyn.control.sampling import MAX_BAD_WORD_SEQUENCES, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams
from dyn.engine.chat_template import GLOBALS, RENDER_ARGUMENTS
from dyn.frontend.api_error import ApiError
from dyn.frontend.beam_search import MAX_BEAM_WIDTH
from dyn.frontend.hints import Hints, parse_hints

__all__ = ["ApiError", "GenerationRequest", "Hints", "SamplingDefaults", "parse_chat", "parse_completion"]

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16
"""`n` at most: each choice holds a batch slot on a worker."""
LEGACY_DEFAULT_MAX_TOKENS = 16
"""/v1/completions without max_tokens generates this many, as OpenAI's API does."""
MAX_STOP_CHARS = 256
MAX_LENGTH_PENALTY = 10.0
MAX_TOKEN_ID = 2**31 - 1
"""Token ids and top_k travel as msgpack ints; no vocabulary comes near this."""
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CHAT_OPTIONS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                           "add_special_tokens", "add_generation_prompt", "continue_final_message"})
"""Chat body keys _chat_options reads."""
JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""response_format json_object: any JSON object."""
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for a function's name."""
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One validated /v1/chat/completions or /v1/completions request."""

    kind: Literal["chat", "completion"]
    model: str
    messages: tuple[dict[str, Any], ...] = ()
    """chat: role and content (flattened to text) dicts; an assistant's tool_calls (arguments as
    objects, as chat templates read them) and a tool result's tool_call_id come along."""
    prompt_text: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = SamplingParams(max_tokens=None, temperature=1.0)
    """What the engine gets (stop strings excepted: the frontend applies them to text).
    max_tokens None: up to the model's context, until `for_prompt` resolves it."""
    n: int = 1
    """Choices to generate (each a request of its own to the workers)."""
    stream: bool = False
    include_usage: bool = False
    hints: Hints = Hints()
    unknown_hints: tuple[str, ...] = ()
    """Hint fields we do not know (ignored; the frontend counts them)."""
    retain_messages: int = 0
    """chat: messages[:retain_messages] carry a retention mark (system prompt, tool schemas)."""
    retain_tokens: int | None = None
    """With hints.retention: only the prompt's leading tokens are retained (None: all blocks)."""
    template_kwargs: dict[str, Any] | None = None
    """chat: the request's chat_template_kwargs, passed to the chat template (Qwen3's enable_thinking)."""
    echo: bool = False
    """completion: the answer starts with the prompt (with logprobs: the prompt's tokens scored)."""
    add_special_tokens: bool = True
    """completion: a text prompt's encoding adds the tokenizer's special tokens (BOS), as vLLM's does."""
    include_stop: bool = False
    """vLLM's include_stop_str_in_output: a matched stop string ends the text instead of being cut."""
    adapter: str | None = None
    """The LoRA adapter the request's `model` names (set once the frontend checked the name)."""
    skip_special_tokens: bool = True
    """vLLM's: False puts special tokens into the text (all but the one that ended the answer)."""
    spaces_between_special_tokens: bool = True
    """vLLM's, with skip_special_tokens False: False writes an added token that follows another
    without the space a decoder may put between them (WordPiece's "[SEP] [CLS]")."""
    beam_search: bool = False
    """vLLM's use_beam_search: the n choices are the n best beams (dyn.frontend.beam_search). A
    beam's one-token step request carries it too (its first token is no client's TTFT)."""
    length_penalty: float = 1.0
    """vLLM's, with beam_search: beams rank by cumulative logprob / length ** length_penalty."""
    prompt_logprobs: int | None = None
    """vLLM's: the answer carries each prompt token's logprob and rank, with this many likeliest
    tokens per position (sampling.prompt_logprobs asks the engine for at least as many)."""
    truncate_prompt_tokens: int | None = None
    """vLLM's: only the prompt's last this many tokens are kept (-1: as many as the context allows)."""
    bad_words: tuple[str, ...] = ()
    """vLLM's bad_words: words the answer may not contain (the frontend tokenizes them into
    sampling.bad_words_token_ids once the tokenizer is at hand)."""
    tools: tuple[dict[str, Any], ...] = ()
    """chat: the functions the model may call (OpenAI's tool objects, for the chat template); empty
    with tool_choice none."""
    tool_choice: tuple[str, str | None] = ("auto", None)
    """chat: ("auto" | "none" | "required", None) or ("named", function name). A forced call
    (required, named) is structured output: the answer is the call(s) as JSON (_forced_call_schema)."""
    single_tool_call: bool = False
    """chat: parallel_tool_calls false: at most the first call the model writes is returned."""
    prompt_end: Literal["turn", "none", "continue"] = "turn"
    """chat: the prompt ends with the assistant's new turn opened (add_generation_prompt, the
    default), without it (add_generation_prompt false), or inside the last, assistant message,
    which the answer continues (continue_final_message: an assistant prefill)."""

    @property
    def prompt_args(self) -> tuple[dict[str, Any] | None, bool, bool]:
        """chat_prompt's arguments after the messages: template args and how the prompt ends."""
        return self.template_args, self.prompt_end == "turn", self.prompt_end == "continue"

    @property
    def template_args(self) -> dict[str, Any] | None:
        """What the chat template gets besides the messages: chat_template_kwargs and the tools."""
        if not self.tools:
            return self.template_kwargs
        return {**(self.template_kwargs or {}), "tools": list(self.tools)}

    def for_prompt(self, num_prompt_tokens: int, max_context: int,
                   default_max_tokens: int | None = None) -> "GenerationRequest":
        """This request with max_tokens resolved for its tokenized prompt: the deployment's default
        (SamplingDefaults.max_tokens) within the context left, else to the context end."""
        if self.sampling.max_tokens is not None:
            return self
        left = max(max_context - num_prompt_tokens, 1)
        max_tokens = left if default_max_tokens is None else min(default_max_tokens, left)
        return replace(self, sampling=replace(self.sampling, max_tokens=max_tokens))

    def with_bad_words(self, encode: Callable[[str], list[int]]) -> "GenerationRequest":
        """This request with its bad words as token sequences, by vLLM's rule: each word as written
        (leading spaces dropped) and, where it tokenizes to as many tokens but another first token,
        after a space (the word inside a sentence). `encode`: text -> ids, no special tokens."""
        if not self.bad_words:
            return self
        sequences: list[tuple[int, ...]] = []
        for index, word in enumerate(self.bad_words):
            bare = tuple(encode(word.lstrip()))
            if not bare:
                raise ApiError(f"bad_words[{index}] {word!r} encodes to no tokens", param="bad_words")
            sequences.append(bare)
            spaced = tuple(encode(" " + word.lstrip()))
            if len(spaced) == len(bare) and spaced[0] != bare[0]:
                sequences.append(spaced)
        if len(sequences) > MAX_BAD_WORD_SEQUENCES:
            raise ApiError(f"bad_words make {len(sequences)} token sequences; at most {MAX_BAD_WORD_SEQUENCES} are "
                           "allowed", param="bad_words")
        return replace(self, sampling=replace(self.sampling, bad_words_token_ids=tuple(sequences)))


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets: OpenAI's values unless the model's
    generation_config.json or the recipe say otherwise (dyn.frontend.sampling_defaults)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = None
    """Chat requests only (completions keep OpenAI's 16); None: to the context end."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


def parse_chat(body: Any, defaults: SamplingDefaults = SamplingDefaults()) -> GenerationRequest:
    """Validate a chat completion body (already JSON-decoded); `defaults` fill what it leaves out."""
    body = _require_object(body)
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise ApiError("'messages' must be a list of message objects", param="messages")
    if not raw:
        raise ApiError("'messages' must contain at least one message", param="messages")
    messages = tuple(parse_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    marked = [i for i, m in enumerate(raw) if isinstance(m, dict) and _is_retain_mark(m, f"messages[{i}]")]
    logprobs = _opt_bool(body, "logprobs") or False
    top_logprobs = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top_logprobs and not logprobs:
        raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = _opt_int(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1, None)
    body, options = _chat_options(body, messages)
    return _common(body, "chat", (max_tokens, logprobs, top_logprobs), defaults, messages=messages,
                   retain_messages=marked[-1] + 1 if marked else 0,
                   template_kwargs=_template_kwargs(body.get("chat_template_kwargs")), **options)


def _chat_options(body: dict, messages: tuple[dict[str, Any], ...]) -> tuple[dict, dict[str, Any]]:
    """Tools and how the prompt ends, as GenerationRequest fields (none for a body without these keys:
    the defaults; the common request skips a dozen lookups). A forced tool_choice returns the body
    with the response_format it implies."""
    if not body.keys() & _CHAT_OPTIONS:
        return body, {}
    if body.get("functions") or body.get("function_call"):
        raise ApiError("'functions' (OpenAI's deprecated form) is not supported; send 'tools'", param="functions")
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    single_call = _opt_bool(body, "parallel_tool_calls") is False
    if _opt_bool(body, "add_special_tokens"):
        raise ApiError("add_special_tokens is not supported for chat: the chat template writes them",
                       param="add_special_tokens")
    add_generation_prompt = _opt_bool(body, "add_generation_prompt") is not False
    continue_final = _opt_bool(body, "continue_final_message") or False
    if continue_final and (body.get("add_generation_prompt") or messages[-1]["role"] != "assistant"):
        raise ApiError("continue_final_message continues the last message, which must be the assistant's "
                       "(and add_generation_prompt false)", param="continue_final_message")
    if choice[0] in ("required", "named"):
        if body.get("response_format") not in (None, {"type": "text"}):
            raise ApiError("a forced tool_choice shapes the answer itself: leave response_format out",
                           param="response_format")
        body = {**body, "response_format": {"type": "json_schema", "json_schema": {
            "name": "tool_call", "schema": _forced_call_schema(tools, choice[1], single_call)}}}
    return body, {"tools": tools if choice[0] != "none" else (), "tool_choice": choice,
                  "single_tool_call": single_call,
                  "prompt_end": "continue" if continue_final else "turn" if add_generation_prompt else "none"}


def parse_completion(body: Any, defaults: SamplingDefaults = SamplingDefaults()) -> GenerationRequest:
    """Validate a legacy completion body; `prompt` is text or token ids; `defaults` as for chat."""
    body = _require_object(body)
    prompt = body.get("prompt")
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 or t > MAX_TOKEN_ID for t in prompt):
            raise ApiError(f"token ids must be between 0 and {MAX_TOKEN_ID}", param="prompt")
        ids = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError("batched prompts are not supported; send one prompt per request", param="prompt")
    else:
        raise ApiError("'prompt' must be a string or a non-empty list of token ids", param="prompt")
    if text is not None and not text:
        raise ApiError("'prompt' must not be empty", param="prompt")
    if text is not None:
        _require_utf8(text, "prompt")
    logprobs = _opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)  # k: also the k likeliest tokens
    echo = _opt_bool(body, "echo") or False
    add_special_tokens = _opt_bool(body, "add_special_tokens") is not False  # vLLM's; BOS for most models
    if body.get("suffix"):
        raise ApiError("suffix is not supported", param="suffix")
    max_tokens = _opt_int(body, "max_tokens", 1, None)
    if "max_tokens" not in body:
        max_tokens = LEGACY_DEFAULT_MAX_TOKENS  # OpenAI's default; an explicit null means "to the context end"
    req = _common(body, "completion", (max_tokens, logprobs is not None, logprobs or 0), defaults,
                  prompt_text=text, prompt_token_ids=ids, echo=echo, add_special_tokens=add_special_tokens)
    if echo and logprobs is not None:  # the prompt's tokens get logprobs too (lm-eval's loglikelihood)
        req = replace(req, sampling=replace(req.sampling, prompt_logprobs=max(logprobs, req.prompt_logprobs or 0)))
    return req


def _common(body: dict, kind: str, output: tuple[int | None, bool, int], defaults: SamplingDefaults,
            **fields: Any) -> GenerationRequest:
    """`output`: max_tokens, logprobs, top_logprobs as the endpoint names them."""
    max_tokens, logprobs, top_logprobs = output
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("'model' must be a non-empty string", param="model")
    n = _opt_int(body, "n", 1, None)
    if n is not None and n > MAX_CHOICES:
        raise ApiError(f"n must be at most {MAX_CHOICES}, got {n}", param="n")
    if _opt_int(body, "best_of", 1, None) not in (None, 1):
        raise ApiError("only best_of=1 is supported", param="best_of")
    presence = _opt_float(body, "presence_penalty", -2.0, 2.0)
    frequency = _opt_float(body, "frequency_penalty", -2.0, 2.0)
    repetition = _opt_float(body, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY)  # vLLM's extension
    if repetition is not None and repetition <= 0.0:
        raise ApiError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]",
                       param="repetition_penalty")
    bias_ids, bias_values = _logit_bias(body.get("logit_bias"))
    temperature = _opt_float(body, "temperature", 0.0, 2.0)
    top_p = _opt_float(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise ApiError("top_p must be in (0, 1]", param="top_p")
    top_k = _opt_int(body, "top_k", -1, MAX_TOKEN_ID)  # -1 or 0: no top-k cut
    min_p = _opt_float(body, "min_p", 0.0, 1.0)  # vLLM's extension
    stream = _opt_bool(body, "stream") or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        if not stream:
            raise ApiError("stream_options is only allowed with stream=true", param="stream_options")
        include_usage = _opt_bool(options, "include_usage", "stream_options.include_usage") or False
    structured = _structured(body)
    hints, unknown = parse_hints(body)
    ignore_eos = hints.ignore_eos
    if ignore_eos is None:
        ignore_eos = _opt_bool(body, "ignore_eos")
    stop = _stop(body.get("stop"))
    min_tokens = _min_tokens(body, max_tokens, bool(structured))
    prompt_logprobs = _prompt_logprobs(body, stream)
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else max(top_k, 0),
        min_p=defaults.min_p if min_p is None else min_p,
        seed=_opt_int(body, "seed", -(2**63), 2**63 - 1), stop_token_ids=_int_list(body, "stop_token_ids"),
        stop=stop, ignore_eos=bool(ignore_eos), min_tokens=min_tokens, logprobs=logprobs, top_logprobs=top_logprobs,
        presence_penalty=defaults.presence_penalty if presence is None else presence,
        frequency_penalty=defaults.frequency_penalty if frequency is None else frequency,
        repetition_penalty=defaults.repetition_penalty if repetition is None else repetition,
        logit_bias_ids=bias_ids, logit_bias_values=bias_values, allowed_token_ids=_allowed_token_ids(body),
        prompt_logprobs=prompt_logprobs, **structured)
    req = GenerationRequest(kind=kind, model=model, sampling=sampling, n=n or 1,  # type: ignore[arg-type]
                            stream=stream, include_usage=include_usage, hints=hints, unknown_hints=unknown,
                            include_stop=_opt_bool(body, "include_stop_str_in_output") or False,
                            bad_words=_bad_words(body.get("bad_words")),
                            truncate_prompt_tokens=_truncate_prompt_tokens(body),
                            skip_special_tokens=_opt_bool(body, "skip_special_tokens") is not False,
                            spaces_between_special_tokens=_opt_bool(body, "spaces_between_special_tokens") is not False,
                            prompt_logprobs=prompt_logprobs, **fields)
    length_penalty = _opt_float(body, "length_penalty", -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY)
    if _opt_bool(body, "use_beam_search"):
        _check_beam_search(req, body)
        return replace(req, beam_search=True, length_penalty=1.0 if length_penalty is None else length_penalty)
    if length_penalty not in (None, 1.0):
        raise ApiError("length_penalty applies only with use_beam_search", param="length_penalty")
    return req


def _check_beam_search(req: GenerationRequest, body: dict) -> None:
    """vLLM's beam search takes none of the fields that shape or end an answer token by token (it
    ignores them); here they are a 400 naming the field rather than ignored."""
    s = req.sampling
    if req.stream:
        raise ApiError("use_beam_search does not stream (as in vLLM); send stream false", param="stream")
    if req.n > MAX_BEAM_WIDTH:
        raise ApiError(f"use_beam_search: n (the beam width) must be at most {MAX_BEAM_WIDTH}", param="n")
    conflicts = {"stop": bool(s.stop), "stop_token_ids": bool(s.stop_token_ids), "min_tokens": bool(s.min_tokens),
                 "presence_penalty": bool(s.presence_penalty), "frequency_penalty": bool(s.frequency_penalty),
                 "bad_words": bool(req.bad_words), "echo": req.echo, "prompt_logprobs": req.prompt_logprobs is not None,
                 "response_format": s.structured is not None}
    for name, conflict in conflicts.items():
        if conflict:
            if name == "response_format":  # (or its vLLM spellings, or a forced tool call)
                name = next((key for key in ("tool_choice", "response_format", "structured_outputs",
                                             *(f for f, _ in _GUIDED)) if body.get(key) is not None), name)
            raise ApiError(f"{name} is not supported with use_beam_search (vLLM's beam search ignores it; "
                           "a deployment default counts too: send the neutral value)", param=name)


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's prompt_logprobs k, for a whole (non-streamed) answer, as vLLM allows it; a stream
    with 0 asks for nothing (vLLM's streams carry no prompt scores)."""
    k = _opt_int(body, "prompt_logprobs", -1, MAX_TOP_LOGPROBS)
    if k == -1:
        raise ApiError(f"prompt_logprobs -1 (every token of the vocabulary) is not supported; ask for at most "
                       f"{MAX_TOP_LOGPROBS}", param="prompt_logprobs")
    if k and stream:
        raise ApiError("prompt_logprobs are not available with stream=true", param="prompt_logprobs")
    return None if stream else k


def _logit_bias(raw: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """OpenAI's logit_bias, {"<token id>": bias in [-100, 100]}, as sorted ids and their biases."""
    if raw is None:
        return (), ()
    if not isinstance(raw, dict):
        raise ApiError("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token <= MAX_TOKEN_ID:
            raise ApiError(f"logit_bias key {key!r} is not a token id", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ApiError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}",
                           param="logit_bias")
        bias[token] = float(value)
    ids = tuple(sorted(bias))
    return ids, tuple(bias[token] for token in ids)


def _allowed_token_ids(body: dict) -> tuple[int, ...]:
    """vLLM's allowed_token_ids: a non-empty list (an empty one would allow nothing)."""
    if body.get("allowed_token_ids") == []:
        raise ApiError("'allowed_token_ids' must not be empty", param="allowed_token_ids")
    return tuple(sorted(set(_int_list(body, "allowed_token_ids"))))


def _min_tokens(body: dict, max_tokens: int | None, structured: bool) -> int:
    """vLLM's min_tokens: EOS, stop_token_ids and stop strings cannot end the answer before this
    many tokens came (a stop string must end in a later token's text)."""
    value = _opt_int(body, "min_tokens", 0, MAX_TOKEN_ID) or 0  # (a token count travels as a msgpack int)
    if value and max_tokens is not None and value > max_tokens:
        raise ApiError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})", param="min_tokens")
    if value and structured:  # a grammar may have to end before min_tokens
        raise ApiError("min_tokens with structured output (response_format JSON, regex, choice, grammar or a "
                       "forced tool call) is not supported", param="min_tokens")
    return value


def _template_kwargs(raw: Any) -> dict[str, Any] | None:
    """chat_template_kwargs (vLLM's and SGLang's extension): variables for the chat template. A name
    dyn passes itself, or one of the template environment's functions, cannot be replaced."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    for key in raw:
        if not _IDENTIFIER.match(key):
            raise ApiError(f"chat_template_kwargs key {key[:64]!r} is not a template variable name",
                           param="chat_template_kwargs")
        if key in RENDER_ARGUMENTS or key in GLOBALS:
            raise ApiError(f"chat_template_kwargs may not set {key!r}: the server sets it",
                           param=f"chat_template_kwargs.{key}")
    return raw or None


def _is_retain_mark(message: dict, where: str) -> bool:
    """A message marked worth keeping: `cache_control` (any object, as Anthropic-style clients send)
    or `dyn: {"retain": true}`."""
    mark = message.get("cache_control")
    if mark is not None and not isinstance(mark, dict):
        raise ApiError("'cache_control' must be an object", param=f"{where}.cache_control")
    ext = message.get("dyn")
    if ext is not None and not isinstance(ext, dict):
        raise ApiError("'dyn' must be an object", param=f"{where}.dyn")
    retain = _opt_bool(ext or {}, "retain", f"{where}.dyn.retain")
    return bool(retain) or mark is not None


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


_GUIDED = tuple((f"guided_{kind}", kind) for kind in ("json", "regex", "choice", "grammar"))
"""vLLM's older structured-output fields: (field, kind)."""


def _structured(body: dict) -> dict[str, str]:
    """The grammar the answer must follow, as SamplingParams fields ({}: free text): OpenAI's
    response_format, or vLLM's spellings, guided_json/_regex/_choice/_grammar and
    structured_outputs {json | json_object | regex | choice | grammar}; one of them. A choice
    becomes a grammar of its strings (as vLLM builds it). The workers compile the result (one
    they cannot use is their 400)."""
    given: list[tuple[str, str, Any]] = []  # (the request's field, kind, value) of each one set
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        given.append(("response_format", "schema", schema))
    for field, kind in _GUIDED:
        if body.get(field) is not None:
            given.append((field, kind, body[field]))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict) or set(outputs) - {"json", "json_object", "regex", "choice", "grammar"}:
            raise ApiError("structured_outputs must be an object with one of json, json_object, regex, choice and "
                           "grammar", param="structured_outputs")
        given += [(f"structured_outputs.{kind}", kind, value) for kind, value in outputs.items()
                  if value is not None and value is not False]
    if not given:
        return {}
    if len(given) > 1:
        raise ApiError(f"give one structured output, not {' and '.join(param for param, _, _ in given)}",
                       param=given[1][0])
    param, kind, value = given[0]
    if kind == "schema":  # (response_format's, as JSON text already)
        return {"json_schema": value}
    if kind == "json_object":
        if value is not True:
            raise ApiError(f"{param} must be true or false", param=param)
        return {"json_schema": JSON_OBJECT_SCHEMA}
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ApiError("the JSON schema is not valid JSON", param=param) from None
        if not isinstance(value, dict):
            raise ApiError("the JSON schema must be an object", param=param)
        return {"json_schema": json.dumps(value, ensure_ascii=False)}
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ApiError(f"{param} must be a non-empty list of non-empty strings", param=param)
        for choice in value:
            _require_utf8(choice, param)
        # an EBNF grammar of the strings (a JSON string literal is one in xgrammar's EBNF too)
        return {"grammar": "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value)}
    if not isinstance(value, str) or not value.strip():
        raise ApiError(f"{param} must be a non-empty string", param=param)
    _require_utf8(value, param)
    return {kind: value}


def _response_format(raw: Any) -> str | None:
    """OpenAI's response_format as the JSON schema the answer must match (json_object: any
    object); None for text."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format.json_schema")
        return json.dumps(spec.get("schema", {}), ensure_ascii=False)
    raise ApiError("response_format type must be text, json_object or json_schema", param="response_format.type")


def _tool_choice(raw: Any, tools: tuple[dict[str, Any], ...]) -> tuple[str, str | None]:
    """tool_choice as (mode, the named function or None); a named one must be among `tools`."""
    if raw is None or raw in ("auto", "none", "required"):
        mode = raw or "auto"
        if mode == "required" and not tools:
            raise ApiError("tool_choice required needs tools", param="tool_choice")
        return mode, None
    function = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError("tool_choice must be auto, none, required or {'type': 'function', 'function': "
                       "{'name': ...}}", param="tool_choice")
    if name not in {tool["function"]["name"] for tool in tools}:
        raise ApiError(f"tool_choice names function {name[:64]!r}, which is not among the tools",
                       param="tool_choice.function.name")
    return "named", name


def _forced_call_schema(tools: tuple[dict[str, Any], ...], name: str | None, single: bool) -> dict[str, Any]:
    """The JSON a forced tool_choice makes the model write (vLLM's shapes): a named function's
    arguments object; for required, a list of {"name", "parameters"} calls of the given tools."""
    params = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"} for tool in tools}
    if name is not None:
        return params[name]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [fn]}, "parameters": schema},
                       "required": ["name", "parameters"]} for fn, schema in params.items()]}
    return {"type": "array", "items": call, "minItems": 1, **({"maxItems": 1} if single else {})}


def _tools(raw: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI function tools, checked (a name the model can write, parameters a JSON schema object)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ApiError("'tools' must be a list of tool objects", param="tools")
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError("each tool must be {'type': 'function', 'function': {...}}", param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise ApiError("function name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                           param=f"{where}.function.name")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ApiError("function parameters must be a JSON schema object", param=f"{where}.function.parameters")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ApiError("function description must be a string", param=f"{where}.function.description")
    return tuple(raw)


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, with each call's arguments decoded: chat templates write
    them with `tojson` (vLLM hands templates the decoded object too)."""
    if not isinstance(raw, list):
        raise ApiError("'tool_calls' must be a list", param=f"{where}.tool_calls")
    calls = []
    for i, call in enumerate(raw):
        at = f"{where}.tool_calls[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError("a tool call needs function.name", param=at)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ApiError("function.arguments must be JSON text", param=f"{at}.function.arguments") from None
        calls.append({"id": call.get("id"), "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return calls


def parse_message(raw: Any, where: str) -> dict[str, Any]:
    """One chat message as the template gets it (content as text, tool calls' arguments decoded)."""
    if not isinstance(raw, dict):
        raise ApiError("each message must be an object with 'role' and 'content'", param=where)
    role = raw.get("role")
    if role not in _ROLES:
        raise ApiError(f"'role' must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role")
    content = raw.get("content")
    if content is None and role == "assistant":
        content = ""  # (an assistant turn that only called tools)
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError("only text content parts ({'type': 'text', 'text': ...}) are supported",
                               param=f"{where}.content[{i}]")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError("'content' must be a string or a list of text parts", param=f"{where}.content")
    _require_utf8(content, f"{where}.content")
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and raw.get("tool_calls"):
        message["tool_calls"] = _tool_calls(raw["tool_calls"], where)
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError("'tool_call_id' must be a string", param=f"{where}.tool_call_id")
        message["tool_call_id"] = call_id
        if isinstance(raw.get("name"), str):
            message["name"] = raw["name"]
    return message


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    for s in stops:
        _require_utf8(s, "stop")
    return tuple(stops)


def _truncate_prompt_tokens(body: dict) -> int | None:
    keep = _opt_int(body, "truncate_prompt_tokens", -1, MAX_TOKEN_ID)
    if keep == 0:
        raise ApiError("truncate_prompt_tokens must be -1 (the context's limit) or a count >= 1",
                       param="truncate_prompt_tokens")
    return keep


def _bad_words(raw: Any) -> tuple[str, ...]:
    """vLLM's bad_words: distinct non-empty strings, in the order given."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
        raise ApiError("'bad_words' must be a list of strings", param="bad_words")
    if len(raw) > MAX_BAD_WORD_SEQUENCES:
        raise ApiError(f"at most {MAX_BAD_WORD_SEQUENCES} bad words are allowed", param="bad_words")
    for index, word in enumerate(raw):
        if not word.strip() or len(word) > MAX_STOP_CHARS:
            raise ApiError(f"bad_words[{index}] must have 1 to {MAX_STOP_CHARS} characters, not all of them "
                           f"spaces, got {word[:40]!r}", param="bad_words")
        _require_utf8(word, "bad_words")
    return tuple(dict.fromkeys(raw))


def _require_utf8(text: str, param: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(f"text contains an invalid character at position {exc.start} "
                       f"(a lone UTF-16 surrogate)", param=param) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(body: dict, key: str, lo: int | None, hi: int | None, param: str | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    param = param or key
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ApiError(f"'{key}' must be an integer, got {type(value).__name__}", param=param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(f"'{key}' must be {bounds}, got {value}", param=param)
    return value


def _opt_float(body: dict, key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(f"'{key}' must be a number, got {type(value).__name__}", param=key)
    if not lo <= value <= hi:
        raise ApiError(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return float(value)


def _opt_bool(body: dict, key: str, param: str | None = None) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ApiError(f"'{key}' must be a boolean, got {type(value).__name__}", param=param or key)
    return value


def _opt_str(body: dict, key: str, param: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ApiError(f"'{key}' must be a string of at most 256 characters", param=param)
    return value


def _int_list(body: dict, key: str) -> tuple[int, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v <= MAX_TOKEN_ID for v in value):
        raise ApiError(f"'{key}' must be a list of token ids between 0 and {MAX_TOKEN_ID}", param=key)
    return tuple(value)
