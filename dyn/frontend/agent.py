"""After an agent turn: speculative prefill of the next turn, and closing a session.

Speculative prefill (hint `speculative_prefill`): the next turn of an agent
conversation starts with this turn's prompt plus its answer. For chat that is
the chat template over the messages and the answer as a new assistant
message (re-tokenized text, closed by the template's end-of-turn marker: not
the decode KV's token ids, which the next prompt often does not repeat); for
completions, prompt + output ids. When a turn finishes, that prefix is sent as a max_tokens=1 request to the worker the
router picks for it now (the session's worker while it is not much worse
loaded), below the request's priority and marked speculative: a worker with
a queue refuses it, and cancels it when real work starts queueing. The next
turn then finds its prefix cached and only prefills the new message.

Closing a session (`dyn.close_session`, `nvext.session_control.action:
close`): the router forgets the session's worker and the worker gives the
session's retained blocks their default retention back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dyn.control.requests import CloseSession, Finish, GenerateRequest, RequestFailed
from dyn.control.sampling import SamplingParams

if TYPE_CHECKING:
    from dyn.frontend.generate import Dispatcher
    from dyn.frontend.protocol import GenerationRequest

log = logging.getLogger(__name__)

AnswerMessage = Callable[[str], dict]
"""An answer's text -> the assistant message the next turn's prompt holds for it."""

SPECULATIVE_TIMEOUT_S = 30.0
"""A speculative prefill that has not finished by then is cancelled (it only warms a cache)."""


class AgentTurns:
    """Runs the post-turn actions of agent hints in the background; owned by the Dispatcher."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self._tasks: set[asyncio.Task] = set()
        self.num_speculative = 0

    def after_turn(self, req: GenerationRequest, prompt_ids: list[int], output_ids: list[int],
                   worker_id: str | None, salt: int, answer_message: AnswerMessage | None = None) -> None:
        """`answer_message`: the answer's text as the assistant message the client sends back
        (its content without reasoning, its tool calls); default: the whole text as content."""
        hints = req.hints
        if hints.speculative_prefill and not hints.close_session and output_ids:
            self._spawn(self._speculate(req, self._next_prefix(req, prompt_ids, output_ids, answer_message), salt))
        if hints.close_session and hints.session_id:
            self._spawn(self._close(hints.session_id, worker_id))

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Tests and shutdown: wait for the background actions."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def _next_prefix(self, req: GenerationRequest, prompt_ids: list[int], output_ids: list[int],
                     answer_message: AnswerMessage | None) -> list[int]:
        if req.kind != "chat":
            return prompt_ids + output_ids
        tok = self.d.tokenizer
        text = tok.decode(output_ids)
        answer = answer_message(text) if answer_message is not None else {"role": "assistant", "content": text}
        return list(tok.chat_prompt((*req.messages, answer), req.template_args))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _speculate(self, req: GenerationRequest, prefix: list[int], salt: int) -> None:
        from dyn.frontend.generate import hint_fields
        from dyn.frontend.protocol import ApiError

        d, metrics = self.d, self.d.metrics
        if len(prefix) + 1 >= d.max_context:
            metrics.speculative_prefills.labels("too_long").inc()
            return
        try:
            choice = d.routing.choose_workers(prefix, req.hints, salt=salt)
        except ApiError:
            metrics.speculative_prefills.labels("no_worker").inc()
            return
        fields = hint_fields(req, d.routing.block_size, d.kv_tiers)
        fields["priority"] = min(req.hints.priority, 0) - 1
        rid = d.new_request_id() + "-spec"
        request = GenerateRequest(rid, prefix, SamplingParams(max_tokens=1, ignore_eos=True), salt=salt,
                                  speculative=True, **fields)
        self.num_speculative += 1
        queue = await d.pool.open(choice.decode, request)
        outcome = "timeout"
        deadline = time.monotonic() + SPECULATIVE_TIMEOUT_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    message = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if isinstance(message, Finish):
                    outcome = "done" if message.reason != "abort" else "cancelled"
                    break
                if isinstance(message, RequestFailed):
                    outcome = "refused" if message.code == "overloaded" else "failed"
                    break
        finally:
            d.pool.close_stream(rid, cancel=outcome == "timeout")
        # The route counted as sent to the worker's breaker (maybe its half-open probe): close it.
        if outcome == "done":
            d.routing.breakers.on_success(choice.decode)
        elif outcome == "failed":
            d.routing.breakers.on_failure(choice.decode)
        metrics.speculative_prefills.labels(outcome).inc()
        log.debug("speculative prefill of %d tokens on %s: %s", len(prefix), choice.decode, outcome,
                  extra={"request_id": rid})

    async def _close(self, session_id: str, worker_id: str | None) -> None:
        d = self.d
        bound = d.routing.router.end_session(session_id)
        for wid in {w for w in (bound, worker_id) if w is not None}:
            await d.pool.send(wid, CloseSession(session_id))
