"""An in-process worker that speaks the real request plane (ROUTER, CURVE, REQUEST_CODEC).

Its "model" is deterministic: the next token is a lowercase letter computed
from the last tokens of the context, so output depends only on the context,
as greedy decoding does. `reply` makes it answer a fixed text instead.
Disaggregation: a prefill_only request answers its first token and a
`kv_offer` that it registers in a shared `kv_store`; a decode request with
`kv_source` "pulls" it from there (and fails with kv_transfer if absent).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from dyn.control.requests import (REQUEST_CODEC, Cancel, Finish, GenerateRequest, RequestFailed,
                                  TokenChunk)
from dyn.control.sampling import PromptLogprobs
from dyn.control.sockets import Security, server_socket


def next_token(context: list[int]) -> int:
    tail = context[-3:]
    return 97 + (sum((i + 1) * t for i, t in enumerate(tail)) * 7 + len(context)) % 26


def prompt_scores(prompt: list[int], k: int) -> PromptLogprobs:
    """The fake model's prompt_logprobs: token i (from 1) scores -i/8 with rank i, its k likeliest
    are the token and the letters after it."""
    tops = [[t] + [97 + (t - 97 + j) % 26 for j in range(1, k)] for t in prompt[1:]]
    return PromptLogprobs([-i / 8 for i in range(1, len(prompt))], tops if k else None,
                          [[-i / 8 - j for j in range(k)] for i in range(1, len(prompt))] if k else None,
                          list(range(1, len(prompt))))


def greedy(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


@dataclass
class FakeWorker:
    worker_id: str
    security: Security
    ctx: zmq.asyncio.Context
    step_s: float = 0.0
    reply: str | None = None
    kv_store: dict = field(default_factory=dict)
    fail_prefill: bool = False
    overloaded: bool = False
    stall_after: int | None = None
    """Stop answering (without failing) after this many generated tokens: a wedged worker."""
    stall: bool = False
    """Set while streaming: every running request stops answering at its next token."""
    wedged: set[str] = field(default_factory=set)
    """Request ids that stop answering at their next token (a request sent later still runs)."""
    requests: list[GenerateRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = server_socket(self.ctx, zmq.ROUTER, "tcp://127.0.0.1:*", self.security)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks: dict[str, asyncio.Task] = {}
        self._serve = asyncio.create_task(self._loop())

    @property
    def active(self) -> set[str]:
        return set(self._tasks)

    async def close(self) -> None:
        self._serve.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(self._serve, *self._tasks.values(), return_exceptions=True)
        self.sock.close(linger=0)

    async def _loop(self) -> None:
        while True:
            client, data = await self.sock.recv_multipart()
            msg = REQUEST_CODEC.decode(data)
            if isinstance(msg, GenerateRequest):
                self.requests.append(msg)
                if self.overloaded:
                    await self._send(client, RequestFailed(msg.request_id, "overloaded", "queue full", True))
                    continue
                if msg.request_id in self._tasks:  # as the real worker: an id is one stream at a time
                    await self._send(client, RequestFailed(msg.request_id, "bad_request",
                                                           f"request id {msg.request_id!r} is already running", False))
                    continue
                self._tasks[msg.request_id] = asyncio.create_task(self._run(client, msg))
            elif isinstance(msg, Cancel):
                self.cancels.append(msg.request_id)
                task = self._tasks.get(msg.request_id)
                if task is not None:
                    task.cancel()

    async def _send(self, client: bytes, message) -> None:
        await self.sock.send_multipart([client, REQUEST_CODEC.encode(message)])

    async def _run(self, client: bytes, msg: GenerateRequest) -> None:
        rid = msg.request_id
        max_tokens = msg.sampling.max_tokens or 16
        want_lp = msg.sampling.logprobs
        context = list(msg.prompt_token_ids)
        done = 0
        scored = msg.sampling.prompt_logprobs
        scores = prompt_scores(context, scored) if scored is not None and msg.kv_source is None else None
        try:
            if msg.prefill_only:
                if self.fail_prefill:
                    await self._send(client, RequestFailed(rid, "internal", "prefill exploded", True))
                    return
                tok = self._token(context, 0)
                await self._send(client, TokenChunk(rid, [tok], [-0.5] if want_lp else None, prompt_logprobs=scores))
                offer = {"worker": self.worker_id, "request_id": rid, "num_tokens": len(context)}
                self.kv_store[(self.worker_id, rid)] = context + [tok]
                self.finished[rid] = "length"
                await self._send(client, Finish(rid, "length", len(context), 1, kv_offer=offer))
                return
            if msg.kv_source is not None:
                pulled = self.kv_store.pop((msg.kv_source["worker"], msg.kv_source["request_id"]), None)
                if pulled is None or pulled[-1] != msg.first_token:
                    await self._send(client, RequestFailed(rid, "kv_transfer", "offer not found", True))
                    return
                context = pulled
                done = 1
            reason = "length"
            while done < max_tokens:
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                if self.stall or rid in self.wedged or (self.stall_after is not None and done >= self.stall_after):
                    await asyncio.Event().wait()  # until cancelled
                tok = self._token(context, done)
                if tok is None:
                    reason = "stop"
                    break
                context.append(tok)
                done += 1
                # top_logprobs: the sampled token first, then the next letters, each less likely
                k = msg.sampling.top_logprobs if want_lp else 0
                top = ([[tok] + [97 + (tok - 97 + j) % 26 for j in range(1, k)]], [[-0.25 - j for j in range(k)]])
                await self._send(client, TokenChunk(rid, [tok], [-0.25] if want_lp else None,
                                                    num_cached_tokens=3 if done == 1 else 0,
                                                    top_ids=top[0] if k else None, top_logprobs=top[1] if k else None,
                                                    prompt_logprobs=scores if done == 1 else None))
                if not self.step_s:
                    await asyncio.sleep(0)
            self.finished[rid] = reason
            await self._send(client, Finish(rid, reason, len(msg.prompt_token_ids), done))
        except asyncio.CancelledError:
            self.finished[rid] = "abort"
            await self._send(client, Finish(rid, "abort", len(msg.prompt_token_ids), done))
        finally:
            self._tasks.pop(rid, None)

    def _token(self, context: list[int], done: int) -> int | None:
        if self.reply is None:
            return next_token(context)
        data = self.reply.encode()
        # position in the reply = tokens generated so far (prompt length is known to the harness)
        idx = done
        return data[idx] if idx < len(data) else None
