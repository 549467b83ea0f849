"""The OpenAI-compatible HTTP API (aiohttp on uvloop).

aiohttp was chosen because it is one mature dependency (server and client),
its per-request overhead is low when handlers build plain dicts, and its
StreamResponse writes SSE chunks as they come with no framework in between.
Handlers are cancelled when the client disconnects (handler_cancellation),
which unwinds the generation and sends Cancel to the worker at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

from dyn.config.recipe import ReasoningParser, ToolCallParser
from dyn.frontend.auth import DEFAULT_TENANT, ApiKeys, Tenant, adapter_salt, tenant_salt
from dyn.frontend.balance import ConnectionBalancer
from dyn.frontend.beam_search import Beam, StepOutput, beam_search
from dyn.frontend.agent import AnswerMessage
from dyn.frontend.generate import Dispatcher
from dyn.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from dyn.frontend.hints import RetentionHint, with_session
from dyn.frontend.middleware import (MAX_BODY_BYTES, REQUEST_ID_HEADER, RID_KEY, TENANT_KEY, auth_middleware,
                                     error_middleware, json_body)
from dyn.frontend.protocol import (MAX_TOKEN_ID, ApiError, GenerationRequest, SamplingDefaults, parse_chat,
                                  parse_completion, parse_message)
from dyn.frontend.reasoning import ReasoningSplitter, thinking_at_start
from dyn.frontend.ratelimit import RateLimiter
from dyn.frontend.responses import (DONE, Answer, Echo, StreamFormatter, chat_logprobs, completion_logprobs,
                                    echoed_logprobs, end_offset, error_event, full_response, scored_prompt)
from dyn.frontend.text import TextTokenizer
from dyn.frontend.tool_calls import AnswerSplitter, ForcedCalls, ToolCallSplitter
from dyn.frontend.worker_stream import Piece, Usage
from dyn.frontend.workers import DECODE_ROLES, WorkerPool

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
log = logging.getLogger(__name__)

OFF_LOOP_CHARS = 16_384
"""Prompts longer than this (characters) are tokenized on a worker thread."""
_JSON = "application/json"
CHOICE_SEPARATOR = "/"
"""Choice i of a request with n > 1 goes to the workers as "<id>/<i>" (no client X-Request-Id holds "/")."""
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
SESSION_HEADER = "X-Dynamo-Session-ID"
"""Dynamo's session header (agent harnesses send it); ours is X-Dyn-Session-Id."""
DYN_SESSION_HEADER = "X-Dyn-Session-Id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_OPEN_TENANT = Tenant(DEFAULT_TENANT)


@dataclass(frozen=True)
class ApiSettings:
    served_model: str
    max_context: int
    max_prompt_tokens: int | None = None
    share_cache_across_tenants: bool = False
    log_prompts: bool = False
    """Put prompt and output text into the log (off by default: they are the tenants' data)."""
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    """What requests get for the sampling fields they leave out (dyn.frontend.sampling_defaults)."""
    reasoning_parser: ReasoningParser = "none"
    """Chat answers split into reasoning_content and content (dyn.frontend.reasoning)."""
    tool_call_parser: ToolCallParser = "none"
    """How the calls of a chat request with tools are read from the answer (dyn.frontend.tool_calls)."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters a request may name as its `model` (recipe model.lora_adapters)."""


class Frontend:
    """What the HTTP handlers share: settings, tokenizer, dispatcher, pool and metrics."""

    def __init__(self, settings: ApiSettings, tokenizer: TextTokenizer, dispatcher: Dispatcher,
                 pool: WorkerPool, metrics: FrontendMetrics, *, api_keys: ApiKeys | None = None,
                 rate_limiter: RateLimiter | None = None) -> None:
        self.api_keys = api_keys
        """None: open API; else the accepted bearer tokens (hashed) and their tenants."""
        self.rate_limiter = rate_limiter or RateLimiter()
        self.active_ids: set[str] = set()
        """Request ids being served (a client's X-Request-Id must not collide with one)."""
        self.settings = settings
        self.tokenizer = tokenizer
        self.dispatcher = dispatcher
        self.pool = pool
        self.metrics = metrics
        self.created = int(time.time())
        self.accepting = True
        """False while draining: new generation requests get 503."""
        self.balancer: ConnectionBalancer | None = None
        """Set when replicas share this one's port: it says which responses close their connection."""

    def keep_alive(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Before `response` is prepared: close the connection after it when this replica holds
        more than its share of the shared port's connections (the client reconnects elsewhere)."""
        if self.balancer is not None and self.balancer.should_close(request):
            response.force_close()
            self.metrics.rebalanced.inc()

    def is_ready(self) -> bool:
        """Ready for traffic: not draining, and a decode-capable worker is ready."""
        return self.accepting and any(w.role in DECODE_ROLES and w.is_ready for w in self.pool.workers.values())


def build_app(frontend: Frontend) -> web.Application:
    middlewares = [error_middleware(frontend.metrics)]
    if frontend.api_keys is not None:
        middlewares.append(auth_middleware(frontend.api_keys))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    handlers = _Handlers(frontend)
    app.router.add_post("/v1/chat/completions", handlers.chat)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/tokenize", handlers.tokenize)
    app.router.add_post("/detokenize", handlers.detokenize)
    app.router.add_get("/tokenizer_info", handlers.tokenizer_info)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def start_site(app: web.Application, host: str, port: int, *,
                     reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); returns the runner and the bound port.

    reuse_port: share the port with the other frontend replicas of this node (SO_REUSEPORT:
    the kernel deals new connections over every process listening on it)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound


async def stop_listening(runner: web.AppRunner, port: int) -> None:
    """Accept no more connections on `port`; the open ones are served on. A draining replica
    does this to the port it shares, so that new connections go to the other replicas."""
    for site in list(runner.sites):
        server = site._server  # type: ignore[attr-defined]  # (aiohttp keeps the listener private)
        if server is not None and any(sock.getsockname()[1] == port for sock in server.sockets):
            await site.stop()


async def add_site(runner: web.AppRunner, host: str, port: int = 0) -> int:
    """One more listener for the same app (a replica's own address beside the shared port)."""
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class _Handlers:
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        return await self._generate(request, parse_chat(body, self.fe.settings.sampling_defaults))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        return await self._generate(request, parse_completion(body, self.fe.settings.sampling_defaults))

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: the ids a chat (`messages`) or completion (`prompt`) body's prompt is
        served as (the same encoding generation uses), their count and the context length."""
        body = await json_body(request)
        if isinstance(body, dict) and body.get("model") is None:  # (vLLM's model is optional here)
            body = {**body, "model": self.fe.settings.served_model}
        parse = parse_chat if isinstance(body, dict) and "messages" in body else parse_completion
        req = parse(body, self.fe.settings.sampling_defaults)
        self._check_model(req.model)
        ids = await self._encode(req)
        return web.json_response({"count": len(ids), "max_model_len": self.fe.settings.max_context,
                                  "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: `tokens` -> `prompt`, the text they decode to."""
        body = await json_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in tokens):
            raise ApiError(f"'tokens' must be a list of token ids between 0 and {MAX_TOKEN_ID}", param="tokens")
        self._check_model(body.get("model"))
        return web.json_response({"prompt": self.fe.tokenizer.decode(tokens)})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        """vLLM's /tokenizer_info: with /tokenize and /detokenize, what lm-eval's remote tokenizer
        needs, so an evaluation runs with the server's tokenizer and no download of its own."""
        return web.json_response({**self.fe.tokenizer.info(), "model_max_length": self.fe.settings.max_context})

    def _check_model(self, model: object) -> None:
        s = self.fe.settings
        if model != s.served_model and model not in s.adapters:
            served = f"{s.served_model!r}" + (f" and its LoRA adapters {list(s.adapters)}" if s.adapters else "")
            raise ApiError(f"model {model!r} does not exist; this server serves {served}", status=404,
                           param="model", code="model_not_found")

    async def models(self, request: web.Request) -> web.Response:
        s = self.fe.settings
        base = {"object": "model", "created": self.fe.created, "owned_by": "dyn", "max_model_len": s.max_context}
        return web.json_response({"object": "list", "data": [
            {"id": s.served_model, **base}, *({"id": name, **base, "parent": s.served_model} for name in s.adapters)]})

    async def health(self, request: web.Request) -> web.Response:
        workers = {w.id: {"role": w.role, "state": w.state, "in_flight": w.in_flight}
                   for w in self.fe.pool.workers.values()}
        ready = self.fe.is_ready()
        return web.json_response({"status": "ready" if ready else "not ready", "workers": workers},
                                 status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.fe.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _generate(self, request: web.Request, req: GenerationRequest) -> web.StreamResponse:
        fe = self.fe
        if not fe.accepting:
            # closed after the answer: a keep-alive client would retry over this connection, here again
            raise ApiError("this frontend is draining; retry on another", status=503, code="draining",
                           type="service_unavailable", retry_after_s=1.0, close_connection=True)
        self._check_model(req.model)
        if req.tools and req.tool_choice[0] == "auto" and fe.settings.tool_call_parser == "none":
            raise ApiError("this deployment reads no tool calls from the model's answers: the recipe's "
                           "model.tool_call_parser is none (hermes or llama3_json, as the model writes calls)",
                           param="tools")
        tenant: Tenant = request.get(TENANT_KEY, _OPEN_TENANT)
        fe.rate_limiter.check(tenant)
        rid = request[RID_KEY] = self._request_id(request)
        session = request.headers.get(SESSION_HEADER) or request.headers.get(DYN_SESSION_HEADER)
        if session is not None or req.unknown_hints:
            req = replace(req, hints=with_session(req.hints, session))
            for field in req.unknown_hints:
                fe.metrics.unknown_hints.labels(field[:64]).inc()
        prompt_ids = await self._prompt_ids(req)
        if req.retain_messages:
            req = await self._retain_marked(req, prompt_ids)
        s, extra = fe.settings, {"request_id": rid}
        req = req.for_prompt(len(prompt_ids), s.max_context,
                             s.sampling_defaults.max_tokens if req.kind == "chat" else None)
        req = req.with_bad_words(lambda text: fe.tokenizer.encode(text, add_special_tokens=False))
        salt = 0 if fe.api_keys is None or s.share_cache_across_tenants else tenant_salt(tenant.name)
        if req.model != s.served_model:  # a LoRA adapter (_check_model): its own KV blocks
            req = replace(req, adapter=req.model)
            salt = adapter_salt(salt, req.model)
            fe.metrics.lora_requests.labels(req.model).inc()
        # debug: the "finished" line below repeats all of it (one info line per request: at
        # thousands of requests/s each log line is a measurable share of the frontend's CPU)
        log.debug("request received: %s, %d prompt tokens, max_tokens %s, tenant %s, priority %d",
                  req.kind, len(prompt_ids), req.sampling.max_tokens, tenant.name, req.hints.priority,
                  extra=extra)
        if req.hints.expected_output_tokens is not None:
            fe.metrics.num_osl_requests += 1
            fe.metrics.num_osl_tokens += req.hints.expected_output_tokens
        usage = Usage()
        public_id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + rid
        fe.metrics.in_flight.inc()
        fe.active_ids.add(rid)
        start = time.perf_counter()
        try:
            if req.beam_search:
                response = await self._beams(request, req, public_id, prompt_ids, rid, usage, salt)
            elif req.n > 1:
                response = await self._choices(request, req, public_id, prompt_ids, rid, usage, salt)
            else:
                echo = self._echo(req, prompt_ids)
                async with aclosing(fe.dispatcher.generate(req, prompt_ids, rid, usage, salt=salt,
                                                           answer_message=self._answer_message(req))) as pieces:
                    if req.stream:
                        response = await self._stream(request, req, public_id, pieces, usage, self._splitter(req),
                                                      echo)
                    else:
                        response = await self._collect(request, req, public_id, pieces, usage, self._splitter(req),
                                                       echo, prompt_ids)
        except ApiError as exc:
            log.info("request refused: %d %s: %s", exc.status, exc.code, exc.message, extra=extra)
            raise
        finally:
            fe.active_ids.discard(rid)
            fe.metrics.in_flight.dec()
            usage.num_completion_tokens = len(usage.token_ids)
            fe.metrics.prompt_tokens.inc(usage.num_prompt_tokens)
            fe.metrics.completion_tokens.inc(usage.num_completion_tokens)
            fe.metrics.cached_tokens.inc(usage.num_cached_tokens)
        elapsed = time.perf_counter() - start
        fe.metrics.e2e.observe(elapsed)
        if req.adapter is not None:
            fe.metrics.lora_e2e.labels(req.adapter).observe(elapsed)
        texts = (f", prompt {_prompt_text(req)!r}, output {fe.tokenizer.decode(usage.token_ids)!r}"
                 if s.log_prompts else "")
        if req.adapter is not None:
            texts = f", LoRA adapter {req.adapter}{texts}"
        # The one info line of a request (received, routing and first-token lines are debug).
        log.info("request finished: %s %s, %d prompt tokens (%d cached), %d of max %d tokens in %.1f ms "
                 "(first after %.1f ms), tenant %s, priority %d, %d migrations, workers %s/%s%s",
                 req.kind, usage.finish_reason, len(prompt_ids), usage.num_cached_tokens, len(usage.token_ids),
                 req.sampling.max_tokens, elapsed * 1000, (usage.ttft_s or 0.0) * 1000, tenant.name,
                 req.hints.priority, usage.num_migrations, usage.prefill_worker or "-", usage.decode_worker,
                 texts, extra=extra)
        return response

    def _request_id(self, request: web.Request) -> str:
        """The client's X-Request-Id when valid and not already in flight here, else a fresh id."""
        client = request.headers.get(REQUEST_ID_HEADER)
        if client is None:
            return self.fe.dispatcher.new_request_id()
        if not _CLIENT_ID.fullmatch(client):
            raise ApiError(f"header {REQUEST_ID_HEADER} must be 1-128 characters of A-Z a-z 0-9 . _ : -, "
                           f"got {client[:140]!r}", param=REQUEST_ID_HEADER, code="invalid_request_id")
        if client in self.fe.active_ids:
            raise ApiError(f"request id {client!r} (header {REQUEST_ID_HEADER}) is already in flight on "
                           "this frontend; send a unique id per request", status=409, param=REQUEST_ID_HEADER,
                           code="duplicate_request_id")
        return client

    async def _encode(self, req: GenerationRequest) -> list[int]:
        """The prompt's token ids, as the workers get them (chat template applied)."""
        tok = self.fe.tokenizer
        if req.kind == "chat":
            size = sum(len(m["content"]) for m in req.messages)
            return await _off_loop(size, tok.chat_prompt, req.messages, *req.prompt_args)
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        return await _off_loop(len(req.prompt_text or ""), tok.encode, req.prompt_text or "", req.add_special_tokens)

    async def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        s = self.fe.settings
        param = "messages" if req.kind == "chat" else "prompt"
        ids = await self._encode(req)
        if not ids:
            raise ApiError("the prompt encodes to zero tokens", param=param)
        limit = min(s.max_prompt_tokens or s.max_context, s.max_context - 1)
        keep = req.truncate_prompt_tokens
        if keep is not None:  # (vLLM's: the prompt's tail, where the question usually is)
            if keep > limit:
                raise ApiError(f"truncate_prompt_tokens ({keep}) exceeds the prompt limit of {limit} tokens",
                               param="truncate_prompt_tokens")
            ids = ids[-(limit if keep == -1 else keep):]
        if len(ids) > limit:
            raise ApiError(f"the prompt has {len(ids)} tokens; the limit is {limit}", param=param,
                           code="context_length_exceeded")
        max_tokens = req.sampling.max_tokens
        if max_tokens is not None and len(ids) + max_tokens > s.max_context:
            raise ApiError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {s.max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return ids

    async def _retain_marked(self, req: GenerationRequest, prompt_ids: list[int]) -> GenerationRequest:
        """Per-message marks: retain the blocks of the prompt up to the last marked message."""
        marked = req.messages[:req.retain_messages]
        head = await _off_loop(sum(len(m["content"]) for m in marked), self.fe.tokenizer.chat_prompt,
                               marked, req.template_args)
        common = 0
        for a, b in zip(head, prompt_ids):
            if a != b:
                break
            common += 1
        retention = req.hints.retention or RetentionHint()
        return replace(req, hints=replace(req.hints, retention=retention), retain_tokens=common)

    def _splitter(self, req: GenerationRequest) -> AnswerSplitter | None:
        """A fresh splitter per choice of a chat, when the recipe names a reasoning parser or the
        request has tools."""
        parser = self.fe.settings.reasoning_parser
        # (under a response_format grammar the answer is JSON from its first token: no reasoning)
        reasoning = (ReasoningSplitter(thinking=thinking_at_start(parser, req.template_kwargs))
                     if parser != "none" and req.kind == "chat" and req.sampling.structured is None else None)
        mode, name = req.tool_choice
        tools = (ToolCallSplitter(self.fe.settings.tool_call_parser) if req.tools and mode == "auto"
                 else ForcedCalls(name) if mode in ("required", "named") else None)
        if reasoning is None and tools is None:
            return None
        return AnswerSplitter(reasoning, tools, single_call=req.single_tool_call)

    def _answer_message(self, req: GenerationRequest) -> AnswerMessage | None:
        """For the speculative prefill of an agent's next turn: the answer as the assistant message
        the client sends back, through the same parse (content without reasoning, tool calls with
        their arguments decoded), so the prefill's prompt is the next turn's. (A call's id is new
        each time: a template that writes ids differs from there on.)"""
        if not req.hints.speculative_prefill or req.kind != "chat" or self._splitter(req) is None:
            return None

        def message(text: str) -> dict:
            split = self._splitter(req).feed(text, final=True)
            raw = {"role": "assistant", "content": split.content or None,
                   "tool_calls": [call.as_dict() for call in split.tool_calls] or None}
            return parse_message(raw, "the answer")
        return message

    def _echo(self, req: GenerationRequest, prompt_ids: list[int]) -> Echo | None:
        """A completion's prompt to send back ahead of its answer (`echo`): as the client wrote
        it, or its token ids decoded."""
        if not req.echo:
            return None
        text = req.prompt_text if req.prompt_text is not None else self.fe.tokenizer.decode(prompt_ids)
        return Echo(text, prompt_ids)

    async def _collect(self, request: web.Request, req: GenerationRequest, public_id: str, pieces,
                       usage: Usage, splitter: AnswerSplitter | None, echo: Echo | None,
                       prompt_ids: list[int]) -> web.Response:
        answer = await self._answer(req, pieces, usage, splitter, echo, prompt_ids)
        return self._whole(request, req, public_id, [answer], usage)

    def _whole(self, request: web.Request, req: GenerationRequest, public_id: str, answers: list[Answer],
               usage: Usage) -> web.Response:
        body = full_response(req.kind, public_id, req.model, answers, usage, req.prompt_logprobs is not None)
        response = web.Response(body=body, content_type=_JSON, headers={REQUEST_ID_HEADER: _rid_of(public_id)})
        self.fe.keep_alive(request, response)
        return response

    async def _answer(self, req: GenerationRequest, pieces, usage: Usage, splitter: AnswerSplitter | None,
                      echo: Echo | None, prompt_ids: list[int], shared_scores: asyncio.Future | None = None,
                      scorer: bool = True) -> Answer:
        """One choice's pieces gathered into its whole answer (after the prompt, with `echo`).
        `shared_scores` (n > 1): the prompt's scores, set by the `scorer` choice, awaited by the others."""
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] = []
        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        reason = "stop"
        scores = None
        async for piece in pieces:
            scores = piece.prompt_logprobs or scores
            texts.append(piece.text)
            if piece.logprobs is not None:
                token_ids.extend(piece.token_ids)
                logprobs.extend(piece.logprobs)
                if piece.top_ids is not None:
                    top_ids.extend(piece.top_ids)
                    top_lps.extend(piece.top_logprobs)  # type: ignore[arg-type]
            if piece.finish_reason:
                reason = piece.finish_reason
                break
        usage.finish_reason = reason
        usage.num_completion_tokens = len(usage.token_ids)
        if shared_scores is not None:
            if scorer:
                shared_scores.set_result(scores)
            else:
                scores = await shared_scores
        lp = None
        if req.sampling.logprobs and logprobs:
            tok = self.fe.tokenizer
            top = (top_ids, top_lps) if len(top_ids) == len(token_ids) else None
            if req.kind == "chat":
                lp = {"content": chat_logprobs(tok, token_ids, logprobs, top)}
            elif echo is None:
                lp = completion_logprobs(tok, token_ids, logprobs, top=top)
            else:
                head = echoed_logprobs(tok, echo, scores, req.sampling.top_logprobs)
                tail = completion_logprobs(tok, token_ids, logprobs, end_offset(head) if head else len(echo.text), top)
                lp = tail if head is None else {key: head[key] + tail[key] for key in head}
        text = "".join(texts)
        if echo is not None:
            text = echo.text + text
        split = splitter.feed(text, final=True) if splitter is not None else None
        if split is not None and split.tool_calls:
            reason = usage.finish_reason = "tool_calls"
        prompt_lp = (None if req.prompt_logprobs is None
                     else scored_prompt(self.fe.tokenizer, prompt_ids, scores, req.prompt_logprobs))
        return Answer(text, reason, lp, split, prompt_lp)

    async def _beams(self, request: web.Request, req: GenerationRequest, public_id: str, prompt_ids: list[int],
                     rid: str, usage: Usage, salt: int) -> web.Response:
        """use_beam_search: the n best beams as the n choices (dyn.frontend.beam_search); each step
        is a one-token request per beam, `<id>/<step>.<beam>`, routed like any other."""
        width, tok = req.n, self.fe.tokenizer
        step_req = replace(req, n=1, sampling=replace(
            req.sampling, max_tokens=1, logprobs=True, top_logprobs=2 * width, ignore_eos=True),
            hints=replace(req.hints, speculative_prefill=False, close_session=False))  # (not after each step)
        usages: list[Usage] = []

        async def step(tokens: list[int], index: int, beam: int) -> StepOutput:
            usages.append(step_usage := Usage())
            async with aclosing(self.fe.dispatcher.generate(step_req, prompt_ids + tokens,
                                                            f"{rid}{CHOICE_SEPARATOR}{index}.{beam}", step_usage,
                                                            salt=salt)) as pieces:
                async for piece in pieces:
                    if piece.token_ids:
                        if piece.logprobs is None or piece.top_ids is None:
                            raise ApiError("use_beam_search needs token logprobs, which this deployment's engine "
                                           "does not return (the mock engine)", param="use_beam_search")
                        return StepOutput(piece.token_ids[0], piece.logprobs[0], piece.top_ids[0],
                                          piece.top_logprobs[0])  # type: ignore[index]
            raise ApiError("a beam search step ended without a token", status=502, type="server_error")

        beams = await beam_search(step, len(prompt_ids), width, req.sampling.max_tokens or 1, tok.eos_token_ids,
                                  ignore_eos=req.sampling.ignore_eos, length_penalty=req.length_penalty)
        k = req.sampling.top_logprobs

        async def whole(beam: Beam) -> AsyncIterator[Piece]:  # a beam as one piece, for _answer
            yield Piece(tok.decode(beam.tokens, req.skip_special_tokens), beam.tokens, beam.logprobs,
                        beam.finish_reason, *(([s.top_ids[:k] for s in beam.steps],
                                               [s.top_logprobs[:k] for s in beam.steps]) if k else ()))
        answers = [await self._answer(req, whole(beam), Usage(), self._splitter(req), None, prompt_ids)
                   for beam in beams]
        first = usages[0]
        usage.num_prompt_tokens, usage.num_cached_tokens = len(prompt_ids), first.num_cached_tokens
        usage.prefill_worker, usage.decode_worker = first.prefill_worker, first.decode_worker
        usage.token_ids = [t for beam in beams for t in beam.tokens]
        usage.num_completion_tokens, usage.finish_reason = len(usage.token_ids), answers[0].finish_reason
        return self._whole(request, req, public_id, answers, usage)

    async def _choices(self, request: web.Request, req: GenerationRequest, public_id: str,
                       prompt_ids: list[int], rid: str, usage: Usage, salt: int) -> web.StreamResponse:
        """n > 1: each choice is a request of its own (`<id>/<i>`; a seeded request's choice i uses
        seed + i), generated side by side: the router sends them where the prompt's KV is, so the
        choices after the first mostly hit the cache. `usage` gets their sum (the prompt once)."""
        usages = [Usage() for _ in range(req.n)]
        echo = self._echo(req, prompt_ids)
        # The first choice scores the prompt (prompt_logprobs, echo with logprobs) and the others take
        # its scores, so they run on the cached prompt instead of prefilling it whole again.
        scores = (asyncio.get_running_loop().create_future()
                  if req.sampling.prompt_logprobs is not None else None)
        runs = [self.fe.dispatcher.generate(_choice_request(req, i, scores is not None), prompt_ids,
                                            f"{rid}{CHOICE_SEPARATOR}{i}", choice_usage, salt=salt,
                                            answer_message=self._answer_message(req))
                for i, choice_usage in enumerate(usages)]
        try:
            if req.stream:
                return await self._stream_choices(request, req, public_id, runs, usages, usage, echo, scores)
            answers = [asyncio.ensure_future(self._answer(req, run, choice_usage, self._splitter(req), echo,
                                                          prompt_ids, scores, scorer=i == 0))
                       for i, (run, choice_usage) in enumerate(zip(runs, usages))]
            try:
                done = await asyncio.gather(*answers)
            finally:  # one choice failed (or the client left): the others stop too
                for answer in answers:
                    answer.cancel()
                await asyncio.gather(*answers, return_exceptions=True)
            _sum_usage(usage, usages)
            return self._whole(request, req, public_id, list(done), usage)
        finally:
            for run in runs:
                await run.aclose()
            _sum_usage(usage, usages)

    async def _stream_choices(self, request: web.Request, req: GenerationRequest, public_id: str, runs,
                              usages: list[Usage], usage: Usage, echo: Echo | None,
                              scores: asyncio.Future | None) -> web.StreamResponse:
        """The choices' pieces as they come, each chunk naming its choice's index. `scores`: the
        prompt's scores, brought by choice 0's first piece; the other choices' first pieces wait
        for them (their echoed prompt is scored with them)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def read(index: int) -> None:
            first = True
            try:
                async for piece in runs[index]:
                    if first and scores is not None:
                        if index == 0:
                            scores.set_result(piece.prompt_logprobs)
                        else:
                            piece = replace(piece, prompt_logprobs=await scores)
                    first = False
                    queue.put_nowait((index, piece))
                    if piece.finish_reason:
                        break
            except Exception as exc:  # handed to the writer (an ApiError is the client's answer)
                queue.put_nowait((index, exc))
            finally:
                if index == 0 and scores is not None and not scores.done():
                    scores.set_result(None)  # choice 0 failed (the request fails with it): free the others
                queue.put_nowait((index, None))

        readers = [asyncio.ensure_future(read(i)) for i in range(req.n)]
        formatters = [StreamFormatter(req.kind, public_id, req.model, self.fe.tokenizer,
                                      include_usage=req.include_usage, index=i, echo=echo) for i in range(req.n)]
        splitters = [self._splitter(req) for _ in range(req.n)]
        try:
            index, item = await queue.get()
            if isinstance(item, Exception):  # before the headers: a refusal keeps its HTTP status
                raise item
            response = web.StreamResponse(headers={**_SSE_HEADERS, REQUEST_ID_HEADER: _rid_of(public_id)})
            self.fe.keep_alive(request, response)
            await response.prepare(request)
            out = b"".join(fmt.first() for fmt in formatters)
            ended = 0
            async with _in_band_errors(response, usage, public_id):
                while True:
                    if isinstance(item, Exception):
                        raise item
                    if item is None:
                        ended += 1
                        if ended == req.n:
                            break
                    else:
                        out += _event_of(formatters[index], item, usages[index], splitters[index])
                    if queue.empty() and out:
                        await response.write(out)
                        out = b""
                    index, item = await queue.get()
                _sum_usage(usage, usages)
                await response.write(out + formatters[0].usage(usage) + DONE)
            return response
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _stream(self, request: web.Request, req: GenerationRequest, public_id: str, pieces,
                      usage: Usage, splitter: AnswerSplitter | None, echo: Echo | None) -> web.StreamResponse:
        fmt = StreamFormatter(req.kind, public_id, req.model, self.fe.tokenizer,
                              include_usage=req.include_usage, echo=echo)
        # Wait for the first piece before the headers: routing and worker refusals
        # (503 + Retry-After, 400) still get a proper HTTP status.
        first = await anext(pieces, None)
        response = web.StreamResponse(headers={**_SSE_HEADERS, REQUEST_ID_HEADER: _rid_of(public_id)})
        self.fe.keep_alive(request, response)
        await response.prepare(request)
        async with _in_band_errors(response, usage, public_id):
            out = fmt.first()
            if first is not None:
                usage.finish_reason = first.finish_reason
                out += _event_of(fmt, first, usage, splitter)
                if not first.finish_reason:
                    await response.write(out)
                    out = b""
                    async for piece in pieces:
                        out += _event_of(fmt, piece, usage, splitter)
                        if piece.finish_reason:
                            usage.finish_reason = piece.finish_reason
                            break
                        if not usage.more_ready:  # else the next piece is already here: one write for both
                            await response.write(out)
                            out = b""
            usage.num_completion_tokens = len(usage.token_ids)
            await response.write(out + fmt.usage(usage) + DONE)
        return response



@asynccontextmanager
async def _in_band_errors(response: web.StreamResponse, usage: Usage, public_id: str):
    """After the SSE headers: a request that fails is told in-band (the error object, then [DONE]);
    a client that left is logged (leaving the handler cancels its work on the workers)."""
    try:
        yield
    except ApiError as exc:
        usage.finish_reason = f"error {exc.code}"
        log.warning("request failed mid-stream: %s", exc.message, extra={"request_id": _rid_of(public_id)})
        await response.write(error_event(exc.body()) + DONE)
    except ConnectionResetError:
        log.info("client went away during %s", public_id)


def _choice_request(req: GenerationRequest, index: int, scored_once: bool = False) -> GenerationRequest:
    """Choice `index` of a request with n > 1: its own seeded stream (seed + index) if seeded; with
    `scored_once`, only choice 0 asks the engine for the prompt's scores."""
    if index == 0:
        return req
    sampling = req.sampling
    if sampling.seed is not None:
        sampling = replace(sampling, seed=(sampling.seed + index) & (2**63 - 1))
    if scored_once:
        sampling = replace(sampling, prompt_logprobs=None)
    return req if sampling is req.sampling else replace(req, sampling=sampling)


def _sum_usage(usage: Usage, usages: list[Usage]) -> None:
    """The choices' usage as one (the prompt and its cached tokens once, the first choice's
    workers and finish); idempotent."""
    first = usages[0]
    usage.num_prompt_tokens, usage.num_cached_tokens = first.num_prompt_tokens, first.num_cached_tokens
    usage.token_ids = [t for u in usages for t in u.token_ids]
    usage.num_completion_tokens = len(usage.token_ids)
    usage.num_migrations = sum(u.num_migrations for u in usages)
    if not (usage.finish_reason or "").startswith("error"):  # (a stream's in-band error stays)
        usage.finish_reason = first.finish_reason
    usage.prefill_worker, usage.decode_worker = first.prefill_worker, first.decode_worker
    usage.ttft_s = min((u.ttft_s for u in usages if u.ttft_s is not None), default=None)


def _event_of(fmt: StreamFormatter, piece: Piece, usage: Usage, splitter: AnswerSplitter | None) -> bytes:
    """The SSE event of a piece; with a reasoning parser or tools, its text split (nothing while
    all of it is held back as a possible start of </think> or of a tool call). Tool calls stream
    as the model writes them; an answer with calls finishes as "tool_calls"."""
    if splitter is None:
        return fmt.piece(piece, usage.num_migrations)
    split = splitter.feed(piece.text, final=bool(piece.finish_reason))
    if not (split.reasoning or split.content or split.call_deltas or piece.finish_reason or piece.logprobs):
        return b""
    if split.tool_calls:
        piece = replace(piece, finish_reason="tool_calls")
    return fmt.piece(piece, usage.num_migrations, split)


def _rid_of(public_id: str) -> str:
    """"chatcmpl-<rid>" -> rid (the id in logs and the X-Request-Id header)."""
    return public_id.split("-", 1)[1]


def _prompt_text(req: GenerationRequest) -> str:
    if req.kind == "chat":
        return "\n".join(f"{m['role']}: {m['content']}" for m in req.messages)
    return req.prompt_text if req.prompt_text is not None else str(list(req.prompt_token_ids or ()))


async def _off_loop(num_chars: int, fn, *args):
    """Tokenize long texts on a thread so one big prompt does not stall every stream."""
    if num_chars < OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _openapi(_request: web.Request) -> web.Response:
    """The API's OpenAPI 3 description (the schema the HTTP fuzz tests generate requests from)."""
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")
