"""The generic engine: a Backend over any ModelRunner (torch, mock, ...).

Per step: the scheduler picks chunks and allocates blocks, the runner
computes them and samples, then the engine appends tokens, caches newly full
blocks, checks stop conditions and reports TokenOutputs. Disaggregation
(export/import of prompt KV), KV events and the lower-tier hooks live here
too; none of it imports torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence as Seq
from typing import Any

from dyn.control.sampling import MAX_BAD_WORD_SEQUENCES, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from dyn.engine.backend import (IMPORTED_PROMPT_SCORES, Backend, EngineRequest, EngineStats, FinishReason,
                                KvExport, KvImport, PromptLogprobs, TokenOutput)
from dyn.engine.block_manager import BlockManager
from dyn.engine.runner import ModelRunner, SeqWork
from dyn.engine.scheduler import Scheduler
from dyn.engine.sequence import Sequence, SequenceStatus
from dyn.errors import EngineError, RequestError
from dyn.kv.events import KvEvent
from dyn.kv.hashing import BlockHashCache

Detokenize = Callable[[list[int]], str]
_INT_ONLY = frozenset((int,))
MAX_TRACKED_SESSIONS = 100_000
"""Sessions whose retained blocks the engine remembers for release_session."""


class Engine(Backend):
    """Continuous-batching engine with a paged, prefix-cached KV pool."""

    def __init__(self, runner: ModelRunner, *, max_batch_size: int = 64,
                 max_num_batched_tokens: int = 2048, detokenize: Detokenize | None = None,
                 clock: Callable[[], float] = time.monotonic, grammars: Callable[[], Any] | None = None) -> None:
        """`grammars`: builds the structured-output compiler (dyn.engine.grammar.Grammars) on the
        first structured-output request; None: such requests are refused (the mock engine)."""
        if max_batch_size < 1 or max_num_batched_tokens < 1:
            raise EngineError(f"max_batch_size ({max_batch_size}) and max_num_batched_tokens "
                              f"({max_num_batched_tokens}) must be >= 1")
        self.runner = runner
        self.block_size = runner.block_size
        self.block_bytes = runner.block_bytes
        self.kv_on_cuda = runner.kv_on_cuda
        self.detokenize = detokenize
        self.clock = clock
        self._make_grammars = grammars
        self._grammars: Any = None
        self._grammars_lock = threading.Lock()
        """Builds the compiler once, whichever thread asks first (preparation runs off the engine's)."""
        self._kv_event_listener = None
        self._lower_tier = None
        self.blocks = BlockManager(runner.num_blocks, runner.block_size,
                                   on_evict=self._on_evict, on_event=self._on_event, clock=clock)
        self._session_blocks: dict[str, set[int]] = {}
        """Per agent session: hashes of the blocks it retained (released when it closes)."""
        self.scheduler = Scheduler(self.blocks, max_batch_size=max_batch_size,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   tier_probe=self._tier_probe, tier_fetch=self._tier_fetch)
        self._seqs: dict[str, Sequence] = {}
        self._hashes = BlockHashCache()
        """Prompt block hashes seen before (shared prefixes hash once)."""
        self._pending: list[TokenOutput] = []
        self._num_arrivals = 0
        self.num_computed_tokens = 0
        self.num_generated_tokens = 0
        self.last_step_duration_s = 0.0
        """Runner-reported time of the last step (modelled for the mock)."""

    @property
    def num_tier_hit_blocks(self) -> int:
        """Cumulative: prefix blocks fetched back from the lower tier instead of recomputed."""
        return self.scheduler.num_tier_hit_blocks

    # -- requests ---------------------------------------------------------------

    def preparation(self, request: EngineRequest) -> Callable[[], None] | None:
        """A structured-output request's grammar, built off the engine thread: the compiler's first
        build takes seconds (imports, the vocabulary) and a large schema's compile up to a second."""
        structured = request.sampling.structured
        if structured is None or self._make_grammars is None:
            return None  # (add_request refuses a grammar this engine cannot do)
        if self._grammars is not None and self._grammars.is_compiled(structured):
            return None
        return lambda: self._compiler().compile(structured)

    def add_request(self, request: EngineRequest) -> None:
        seq = self._new_sequence(request)
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        if seq.status in (SequenceStatus.IMPORTING, SequenceStatus.EXPORTED):
            self.scheduler.release_blocks(seq)
        else:
            self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._pending = [o for o in self._pending if o.request_id != request_id]

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    def expire(self) -> int:
        num = self.blocks.expire()
        return num + (self._lower_tier.expire() if self._lower_tier is not None else 0)

    def release_session(self, session_id: str) -> None:
        hashes = sorted(self._session_blocks.pop(session_id, ()))
        self.blocks.release(hashes)
        if self._lower_tier is not None:
            self._lower_tier.release(hashes)

    def step(self) -> list[TokenOutput]:
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            self.last_step_duration_s = 0.0
            return outputs
        work = [SeqWork(s.request.request_id, s.all_token_ids[s.num_computed:s.num_computed + num],
                        s.num_computed, s.block_ids, sample, s.request.sampling,
                        len(s.all_token_ids) - s.num_prompt_tokens, s.all_token_ids, s.num_prompt_tokens,
                        s.constraint if sample else None, s.request.resumed_tokens)
                for s, num, sample in batch]
        result = self.runner.execute(work)
        self.last_step_duration_s = result.duration_s
        advance, sampled, logprobs = self.scheduler.advance, result.sampled, result.logprobs
        block_size, finish_reason = self.block_size, self._finish_reason
        for seq, num, sample in batch:
            if result.prompt is not None and seq.request.request_id in result.prompt:
                _add_scores(seq, result.prompt[seq.request.request_id])
            advance(seq, num)
            self.num_computed_tokens += num
            if not sample:
                continue
            rid = seq.request.request_id
            token = sampled.get(rid)
            if token is None:
                raise EngineError(f"runner returned no token for request {rid!r}")
            seq.append_token(token, block_size)
            self.num_generated_tokens += 1
            reason, error = finish_reason(seq, token), None
            if seq.constraint is not None:
                reason, error = _constrained(seq.constraint, token, reason)
            logprob = logprobs.get(rid) if logprobs else None
            output = TokenOutput(
                rid, [token], reason is not None, reason, error,
                [logprob] if logprob is not None and seq.request.sampling.logprobs else None,
                seq.num_cached_tokens if seq.is_first_output else 0)
            if result.top and rid in result.top:
                top_ids, top_lps = result.top[rid]
                output.top_ids, output.top_logprobs = [top_ids], [top_lps]
            if seq.needs_prompt_scores and self.runner.scores_prompts:
                output.prompt_logprobs = seq.prompt_scores or _no_scores(seq.request.sampling.prompt_logprobs)
            outputs.append(output)
            seq.is_first_output = False
            if reason is not None:
                self._finish(seq, reason)
        return outputs

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_kv_blocks_total=self.blocks.num_blocks,
            num_kv_blocks_used=self.blocks.num_used_blocks,
            num_kv_blocks_free=self.blocks.num_free_blocks,
            prefix_hit_blocks=sched.prefix_hit_blocks,
            prefix_lookup_blocks=sched.prefix_lookup_blocks,
            num_computed_tokens=self.num_computed_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=sched.num_preemptions,
            num_tier_hit_blocks=sched.num_tier_hit_blocks,
            num_waiting_prefill_tokens=sum(
                max(0, s.num_prompt_tokens - s.num_computed)
                for s in (*sched.running, *sched.waiting)))

    # -- disaggregation -----------------------------------------------------------

    def export_kv(self, request_id: str) -> KvExport:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.EXPORTED:
            state = "unknown" if seq is None else seq.status.value
            raise RequestError(f"request {request_id!r} has no KV to export (state: {state}); "
                               "only finished prefill_only requests export", field="request_id")
        num_full = seq.num_prompt_tokens // self.block_size
        return KvExport(request_id=request_id, block_hashes=seq.block_hashes[:num_full],
                        block_views=[self.runner.block_view(b) for b in seq.block_ids[:num_full]],
                        first_token=seq.all_token_ids[seq.num_prompt_tokens],
                        num_prompt_tokens=seq.num_prompt_tokens)

    def release_export(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is SequenceStatus.EXPORTED:
            del self._seqs[request_id]
            self.scheduler.release_blocks(seq)
            seq.status = SequenceStatus.FINISHED

    def release_stale_exports(self, max_age_s: float) -> list[str]:
        """Release exports older than `max_age_s` (their consumer vanished); returns their ids."""
        now = self.clock()
        stale = [rid for rid, s in self._seqs.items() if s.status is SequenceStatus.EXPORTED
                 and now - s.exported_at_s > max_age_s]
        for rid in stale:
            self.release_export(rid)
        return stale

    def begin_import(self, request: EngineRequest, block_hashes: list[int]) -> KvImport:
        if request.sampling.prompt_logprobs is not None:
            raise RequestError(IMPORTED_PROMPT_SCORES, field="prompt_logprobs")
        seq = self._new_sequence(request)
        expected = seq.block_hashes[:seq.num_prompt_tokens // self.block_size]
        if len(block_hashes) > len(expected):
            raise RequestError(f"{len(block_hashes)} block hashes offered for a prompt of "
                               f"{seq.num_prompt_tokens} tokens, which has {len(expected)} full "
                               f"blocks of {self.block_size}", field="block_hashes")
        for idx, (got, want) in enumerate(zip(block_hashes, expected)):
            if got != want:
                raise RequestError(f"block hash {idx} is {got}, this engine computes {want} for "
                                   "the same tokens: block_size or salt differ between engines",
                                   field="block_hashes")
        local = [self.blocks.lookup(h) for h in block_hashes]
        missing_idx = [i for i, b in enumerate(local) if b is None]
        hit_ids = [b for b in local if b is not None]
        needed = len(missing_idx) + sum(1 for b in hit_ids if self.blocks.ref_count(b) == 0)
        if not self.blocks.can_allocate(needed):
            raise RequestError(f"KV pool full: import of {request.request_id!r} needs {needed} "
                               f"blocks, {self.blocks.num_free_blocks} free; retry later or "
                               "prefill locally", field="request_id")
        self.blocks.lock(hit_ids)
        new_ids = iter(self.blocks.allocate(len(missing_idx)))
        seq.block_ids = [b if b is not None else next(new_ids) for b in local]
        seq.num_computed = len(block_hashes) * self.block_size
        seq.status = SequenceStatus.IMPORTING
        self._seqs[seq.request_id] = seq
        return KvImport(missing_idx, [self.runner.block_view(seq.block_ids[i])
                                      for i in missing_idx])

    def commit_import(self, request_id: str, first_token: int) -> None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.IMPORTING:
            raise RequestError(f"request {request_id!r} has no import in progress",
                               field="request_id")
        if not isinstance(first_token, int) or not 0 <= first_token < self.runner.vocab_size:
            raise RequestError(f"first_token {first_token!r} is outside the vocabulary "
                               f"[0, {self.runner.vocab_size})", field="first_token")
        self.scheduler.register_computed(seq)
        seq.num_cached_tokens = seq.num_computed
        if seq.constraint is not None and not seq.constraint.accept(first_token):
            raise RequestError(f"first_token {first_token} breaks the request's response_format grammar",
                               field="first_token")  # (the prefill worker sampled it under the same one)
        seq.append_token(first_token, self.block_size)
        reason = self._finish_reason(seq, first_token)
        if reason is None:
            self.scheduler.add(seq)
            return
        self._pending.append(TokenOutput(request_id, [], finished=True, finish_reason=reason,
                                         num_cached_tokens=seq.num_cached_tokens))
        self._finish(seq, reason)

    def cancel_import(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is SequenceStatus.IMPORTING:
            self.abort(request_id)

    # -- internals -----------------------------------------------------------------

    def _new_sequence(self, request: EngineRequest) -> Sequence:
        _check_request(request, self.runner, self._seqs)
        constraint = self._constraint(request) if request.sampling.structured is not None else None
        self._num_arrivals += 1
        seq = Sequence.from_request(request, self._num_arrivals, self.block_size, self._hashes)
        seq.constraint = constraint
        return seq

    def _constraint(self, request: EngineRequest) -> Any:
        """The request's grammar, advanced past a migrated request's earlier output."""
        if self._make_grammars is None:
            raise RequestError("this engine does not do structured output (response_format JSON, regex, choice, "
                               "grammar); the torch and vllm engines do", field="response_format")
        constraint = self._compiler().constraint(request.sampling.structured)
        resumed = request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:]
        if not all(constraint.accept(token) for token in resumed):
            raise RequestError("the resumed output does not follow the request's grammar", field="resumed_tokens")
        return constraint

    def _compiler(self) -> Any:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = self._make_grammars()
            return self._grammars

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        request = seq.request
        sampling = request.sampling
        held = sampling.min_tokens and seq.num_generated <= sampling.min_tokens  # (the runner masks them too)
        if not sampling.ignore_eos and token in self.runner.eos_token_ids and not held:
            return "stop"
        if sampling.stop_token_ids and token in sampling.stop_token_ids and not held:
            return "stop"
        if sampling.stop and self.detokenize is not None and not held and self._hit_stop_string(seq):
            return "stop"
        num_tokens = len(seq.all_token_ids)
        if num_tokens - seq.num_prompt_tokens >= sampling.max_tokens or request.prefill_only:
            return "length"
        if num_tokens >= self.runner.max_context:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # A stop string ending at the new token lies within its last few tokens
        # (each token is at least one character), so only the tail is decoded.
        assert self.detokenize is not None
        stops, output = seq.sampling.stop, seq.output_token_ids
        start = max(len(output) - 2 * max(len(s) for s in stops) - 4, 0)
        text = self.detokenize(output[start:])
        # Under min_tokens a stop string must end in the text of a later token (as the frontend's).
        floor = len(self.detokenize(output[start:seq.sampling.min_tokens])) if seq.sampling.min_tokens > start else 0
        return any(text.find(s, max(floor - len(s) + 1, 0)) != -1 for s in stops)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        request = seq.request
        if request.session_id is not None and request.retention is not None:
            blocks = self._session_blocks.pop(request.session_id, set())  # re-insert: most recent last
            blocks.update(seq.block_hashes[:seq.num_retained_blocks])
            self._session_blocks[request.session_id] = blocks
            if len(self._session_blocks) > MAX_TRACKED_SESSIONS:
                # Never closed: stop tracking the stalest (its blocks keep retention until their TTL).
                del self._session_blocks[next(iter(self._session_blocks))]
        if seq.request.prefill_only:
            self.scheduler.remove(seq, keep_blocks=True)
            seq.status = SequenceStatus.EXPORTED
            seq.exported_at_s = self.clock()
            return
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]

    def _on_event(self, event: KvEvent) -> None:
        if self._kv_event_listener is not None:
            self._kv_event_listener(event)

    def _on_evict(self, block_id: int, block_hash: int, parent_hash: int | None, priority: int,
                  ttl_s: float | None) -> None:
        if self._lower_tier is not None:
            self._lower_tier.offload(block_hash, parent_hash, self.runner.block_view(block_id),
                                     priority, ttl_s)

    def _tier_probe(self, block_hashes: Seq[int]) -> int:
        if self._lower_tier is None:
            return 0
        num = 0
        for block_hash in block_hashes:
            if not self._lower_tier.contains(block_hash):
                break
            num += 1
        return num

    def _tier_fetch(self, block_hashes: Seq[int], block_ids: Seq[int]) -> int:
        if self._lower_tier is None:
            return 0
        num = 0
        for block_hash, block_id in zip(block_hashes, block_ids):
            if not self._lower_tier.fetch(block_hash, self.runner.block_view(block_id)):
                break
            num += 1
        return num


def _constrained(constraint: Any, token: int, reason: FinishReason | None) -> tuple[FinishReason | None, str | None]:
    """A structured-output request's finish after `token`: its JSON complete ends it."""
    if not constraint.accept(token):  # (the mask allows only what the grammar accepts)
        return "error", f"token {token} breaks the request's response_format grammar"
    return ("stop" if constraint.done else reason), None


def _add_scores(seq: Sequence, scores: PromptLogprobs) -> None:
    """A step's prompt scores after the ones before (a chunk starting at 0, first or recomputed
    after a preemption, starts them over)."""
    held = seq.prompt_scores
    if seq.num_computed == 0 or held is None:
        seq.prompt_scores = scores
        return
    held.logprobs += scores.logprobs
    if held.ranks is not None and scores.ranks is not None:
        held.ranks += scores.ranks
    if held.top_ids is not None and scores.top_ids is not None:
        held.top_ids += scores.top_ids
        held.top_logprobs += scores.top_logprobs  # type: ignore[operator]


def _no_scores(k: int) -> PromptLogprobs:
    """The scores of a one-token prompt: nothing before its token to score it on."""
    return PromptLogprobs([], [] if k else None, [] if k else None, [])


def _check_request(request: EngineRequest, runner: ModelRunner,
                   live: dict[str, Sequence]) -> None:
    """Raise RequestError naming the first bad field of `request`."""
    if not isinstance(request, EngineRequest):
        raise RequestError(f"expected an EngineRequest, got {type(request).__name__}")
    rid = request.request_id
    if not isinstance(rid, str) or not rid:
        raise RequestError(f"request_id must be a non-empty string, got {rid!r}",
                           field="request_id")
    if rid in live:
        raise RequestError(f"duplicate request_id {rid!r}: a request with this id is "
                           f"already {live[rid].status.value}", field="request_id")
    prompt = request.prompt_token_ids
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(f"request {rid!r}: prompt_token_ids must be a non-empty list of ints",
                           field="prompt_token_ids")
    vocab = runner.vocab_size
    if not (_INT_ONLY.issuperset(map(type, prompt)) and min(prompt) >= 0 and max(prompt) < vocab):
        # (the check above runs in C; this loop only names the first bad token)
        for idx, tok in enumerate(prompt):
            if type(tok) is not int or not 0 <= tok < vocab:
                raise RequestError(f"request {rid!r}: prompt_token_ids[{idx}] = {tok!r} is not a "
                                   f"token id in [0, {vocab})", field="prompt_token_ids")
    if len(prompt) >= runner.max_context:
        raise RequestError(f"request {rid!r}: prompt has {len(prompt)} tokens; the model's "
                           f"context is {runner.max_context} including at least one generated "
                           "token", field="prompt_token_ids")
    _check_sampling(request, vocab)
    for field in ("logit_bias_ids", "allowed_token_ids", "bad_words_token_ids"):
        if getattr(request.sampling, field) and not runner.biases_logits:
            raise RequestError(f"request {rid!r}: this engine does not do {field} (it samples no logits); the "
                               "torch and vllm engines do", field=field)
    if request.adapter is not None:
        raise RequestError(f"request {rid!r}: this engine does not run LoRA adapters ({request.adapter!r}); the "
                           "vllm engine does (recipe model.lora_adapters)", field="adapter")
    if type(request.resumed_tokens) is not int or not 0 <= request.resumed_tokens < len(prompt):
        raise RequestError(f"request {rid!r}: resumed_tokens must be an int in [0, {len(prompt)}), got "
                           f"{request.resumed_tokens!r}", field="resumed_tokens")
    if type(request.priority) is not int:
        raise RequestError(f"request {rid!r}: priority must be an int, got {request.priority!r}",
                           field="priority")
    if type(request.salt) is not int or not 0 <= request.salt < 2**64:
        raise RequestError(f"request {rid!r}: salt must be an int in [0, 2**64), got "
                           f"{request.salt!r}", field="salt")
    longest = min(len(prompt) + request.sampling.max_tokens, runner.max_context)
    num_blocks = -(-longest // runner.block_size)
    if num_blocks > runner.num_blocks:
        raise RequestError(f"request {rid!r}: {longest} tokens need {num_blocks} KV blocks but "
                           f"the pool has {runner.num_blocks}; lower max_tokens or the prompt",
                           field="max_tokens")


def _check_sampling(request: EngineRequest, vocab: int) -> None:
    sp, rid = request.sampling, request.request_id

    def bad(field: str, why: str) -> RequestError:
        return RequestError(f"request {rid!r}: {field} {why}, got {getattr(sp, field)!r}",
                            field=field)

    if type(sp.max_tokens) is not int or sp.max_tokens < 1:
        raise bad("max_tokens", "must be an int >= 1")
    if not isinstance(sp.temperature, (int, float)) or not (math.isfinite(sp.temperature)
                                                            and sp.temperature >= 0):
        raise bad("temperature", "must be a finite number >= 0")
    if not isinstance(sp.top_p, (int, float)) or not 0 < sp.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]")
    if type(sp.top_k) is not int or sp.top_k < 0:
        raise bad("top_k", "must be an int >= 0 (0: no cut)")
    if not isinstance(sp.min_p, (int, float)) or not 0 <= sp.min_p <= 1:
        raise bad("min_p", "must be in [0, 1]")
    if sp.seed is not None and type(sp.seed) is not int:
        raise bad("seed", "must be an int or None")
    if type(sp.min_tokens) is not int or not 0 <= sp.min_tokens <= sp.max_tokens:
        raise bad("min_tokens", f"must be an int in [0, max_tokens {sp.max_tokens}]")
    for field in ("logit_bias_ids", "allowed_token_ids"):
        ids = getattr(sp, field)
        if not _INT_ONLY.issuperset(map(type, ids)) or any(not 0 <= token < vocab for token in ids):
            raise bad(field, f"must be token ids in [0, {vocab})")
    guides = [text for text in (sp.json_schema, sp.regex, sp.grammar) if text is not None]
    if len(guides) > 1 or not all(isinstance(text, str) and text for text in guides):
        raise RequestError(f"request {rid!r}: at most one of json_schema, regex and grammar may be set, as a "
                           "non-empty string", field="json_schema")
    if len(sp.bad_words_token_ids) > MAX_BAD_WORD_SEQUENCES or any(
            not words or not _INT_ONLY.issuperset(map(type, words)) or min(words) < 0 or max(words) >= vocab
            for words in sp.bad_words_token_ids):
        raise bad("bad_words_token_ids", f"must be at most {MAX_BAD_WORD_SEQUENCES} non-empty sequences of "
                  f"token ids in [0, {vocab})")
    if len(sp.logit_bias_values) != len(sp.logit_bias_ids) or any(
            not isinstance(v, (int, float)) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for v in sp.logit_bias_values):
        raise bad("logit_bias_values", f"must be one number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] per id")
    if type(sp.top_logprobs) is not int or not 0 <= sp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"must be an int in [0, {MAX_TOP_LOGPROBS}]")
    if sp.prompt_logprobs is not None and (type(sp.prompt_logprobs) is not int
                                           or not 0 <= sp.prompt_logprobs <= MAX_TOP_LOGPROBS):
        raise bad("prompt_logprobs", f"must be None or an int in [0, {MAX_TOP_LOGPROBS}]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
            raise bad(name, "must be in [-2, 2]")
    if not isinstance(sp.repetition_penalty, (int, float)) or not (math.isfinite(sp.repetition_penalty)
                                                                   and sp.repetition_penalty > 0):
        raise bad("repetition_penalty", "must be a finite number > 0")
    if any(type(t) is not int or not 0 <= t < vocab for t in sp.stop_token_ids):
        raise bad("stop_token_ids", f"must be token ids in [0, {vocab})")
    if any(not isinstance(s, str) or not s for s in sp.stop):
        raise bad("stop", "must be non-empty strings")
