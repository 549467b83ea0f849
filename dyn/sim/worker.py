"""One simulated worker: a continuous-batching queue stepped by an analytic time model.

Each step, like the engine's scheduler: every admitted decoding sequence
advances one token, and the rest of the token budget goes to prefill chunks
in arrival order; the step lasts prefill_step(chunk tokens) + decode_step(
batch, context) from the role's profile (a mixed step pays both, as the mock
engine does). Admission is FIFO and needs the whole prompt + output in KV
(reservation, so there is no preemption); blocks are exact (SimKvCache).

Decoding sequences live in a heap keyed by the step they finish on, and the
batch's context total is kept incrementally, so a step costs O(finishing
sequences), not O(batch).

A pure-decode batch runs as one event up to its next finish ("macro step"):
with the batch fixed, k steps last k(a + b n + c C) + c n k(k-1)/2 (the
profile's affine step time, the context C growing by n per step), so a
rack's decode workers cost events per batch change, not per token. Work
arriving mid-way cuts the run at the step boundary after it (`cut_at`), as
the engine would admit it at its next step.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from dyn.engine.profile import RoleProfile
from dyn.router.types import WorkerLoad
from dyn.sim.kvcache import SimKvCache
from dyn.sim.workload import SimRequest

State = Literal["starting", "ready", "draining", "flipping", "stopped"]


@dataclass(slots=True)
class Job:
    req: SimRequest
    hashes: list[int]
    hit: int = 0
    todo_tokens: int = 0
    """Prompt tokens left to compute (0 for an imported prompt)."""
    private: int = 0
    """Private blocks held: uncommitted prompt blocks, the partial block and the output."""
    decode_here: bool = True
    admitted: bool = False
    end_step: int = 0


class StepOutcome(NamedTuple):
    first_tokens: list[Job]
    """Prefills that finished this step (their first token is out)."""
    handoffs: list[Job]
    """Of those, prefill-only jobs whose KV now goes to a decode worker."""
    finished: list[Job]


@dataclass(slots=True)
class SimWorker:
    id: str
    role: str
    num_gpus: int
    domain: str | None
    profile: RoleProfile
    block_size: int
    launched_s: float
    ready_s: float
    max_queue: int = 256
    kv_blocks: int | None = None
    """KV pool in this worker's blocks (None: the profile's num_kv_blocks)."""
    state: State = "starting"
    flip_to: str | None = None
    stopped_s: float | None = None
    busy: bool = False
    incoming: int = 0
    """Handoffs routed here whose KV is still in flight."""
    cache: SimKvCache = field(init=False)
    waiting: deque[Job] = field(default_factory=deque)
    prefilling: list[Job] = field(default_factory=list)
    decoding: list[tuple[int, int, Job]] = field(default_factory=list)
    step_idx: int = 0
    ctx_sum: int = 0
    event_seq: int = 0
    hit_blocks: int = 0
    lookup_blocks: int = 0
    step_s: float = 0.0
    """Duration of the step in flight."""
    step_decodes: int = 0
    """Sequences decoding in the step in flight."""
    step_count: int = 1
    """Steps the event in flight covers (> 1: a pure-decode macro step)."""
    step_start_s: float = 0.0
    step_epoch: int = 0
    """Bumped when a macro step is cut: the superseded completion event is ignored."""
    _chunks: list[tuple[Job, int]] = field(default_factory=list)
    _load: WorkerLoad | None = None
    """`load()` until the worker's queues or pool change (submit, step start, step end)."""

    def __post_init__(self) -> None:
        self.cache = SimKvCache(self.kv_blocks or self.profile.num_kv_blocks)

    # ---- requests -------------------------------------------------------------------------

    @property
    def is_accepting(self) -> bool:
        return self.state == "ready"

    @property
    def num_jobs(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    @property
    def is_idle(self) -> bool:
        return not self.num_jobs and not self.incoming

    def submit(self, req: SimRequest, *, prefill: bool, decode_here: bool) -> None:
        """Queue a prompt to prefill here, or (prefill=False) an imported prompt to decode."""
        self._load = None
        job = Job(req, req.block_hashes, decode_here=decode_here)
        job.todo_tokens = req.input_tokens if prefill else 0
        self.waiting.append(job)

    def fits(self, req: SimRequest) -> bool:
        """Whether the request's prompt and output could ever fit this worker's KV pool."""
        return -(-(req.input_tokens + req.output_tokens) // self.block_size) <= self.cache.capacity

    def load(self) -> WorkerLoad:
        if self._load is not None:
            return self._load
        waiting_tokens = sum(j.todo_tokens for j in self.waiting) + sum(j.todo_tokens for j in self.prefilling)
        role = self.role if self.role in ("prefill", "decode") else "both"
        self._load = WorkerLoad(self.id, role, waiting_prefill_tokens=waiting_tokens,
                                active_decode_blocks=self.ctx_sum // self.block_size,
                                num_running=len(self.prefilling) + len(self.decoding),
                                num_waiting=len(self.waiting), kv_usage=self.cache.usage,
                                max_queue=self.max_queue, num_kv_blocks=self.cache.capacity,
                                nvlink_domain=self.domain)
        return self._load

    # ---- stepping -------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Compose the next batch; its duration, or None when there is nothing to run."""
        self._load = None
        self._admit()
        n_dec = len(self.decoding)
        budget = max(self.profile.max_num_batched_tokens - n_dec, 0)
        chunks: list[tuple[Job, int]] = []
        total = 0
        for job in self.prefilling:
            if budget <= 0:
                break
            take = min(job.todo_tokens, budget)
            chunks.append((job, take))
            budget -= take
            total += take
        self._chunks = chunks
        self.step_decodes = n_dec
        if not n_dec and not total:
            return None
        if not total:
            self.step_count = self.decoding[0][0] - self.step_idx
            return self._decode_run_s(self.step_count)
        self.step_count = 1
        self.step_s = self.profile.prefill_step_s(total) + self.profile.decode_step_s(n_dec, self.ctx_sum)
        return self.step_s

    def cut_at(self, elapsed_s: float) -> float | None:
        """Work arrived `elapsed_s` into a macro step: end it at the boundary of the step running
        then. Returns the new duration from its start, or None if it ends there anyway."""
        if self.step_count <= 1:
            return None
        steps = self._steps_within(elapsed_s)
        if steps >= self.step_count:
            return None
        self.step_count = steps
        self.step_epoch += 1
        return self._decode_run_s(steps)

    def _decode_run_s(self, steps: int) -> float:
        """Duration of `steps` pure-decode steps of the current batch (sets step_s, their mean)."""
        t, n = self.profile.timing, self.step_decodes
        first = t.decode_base_s + t.decode_s_per_seq * n + t.decode_s_per_ctx_token * self.ctx_sum
        total = steps * first + t.decode_s_per_ctx_token * n * steps * (steps - 1) / 2
        self.step_s = total / steps
        return total

    def _steps_within(self, elapsed_s: float) -> int:
        """Fewest steps whose run lasts at least `elapsed_s` (at least 1)."""
        lo, hi = 1, self.step_count
        while lo < hi:
            mid = (lo + hi) // 2
            if self._decode_run_s(mid) >= elapsed_s:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def finish_step(self) -> StepOutcome:
        first, handoffs, finished = [], [], []
        self._load = None
        self.step_idx += self.step_count
        self.ctx_sum += self.step_decodes * self.step_count
        decoding = self.decoding
        while decoding and decoding[0][0] <= self.step_idx:
            _, _, job = heapq.heappop(decoding)
            self.ctx_sum -= job.req.input_tokens + job.req.output_tokens
            self.cache.release(job.hashes, job.private)
            finished.append(job)
        for job, take in self._chunks:
            job.todo_tokens -= take
            if job.todo_tokens:
                continue
            self.prefilling.remove(job)
            self.cache.commit(job.hashes[job.hit:])
            job.private -= len(job.hashes) - job.hit
            first.append(job)
            if not job.decode_here:
                self.cache.release(job.hashes, job.private)
                handoffs.append(job)
            elif job.req.output_tokens <= 1:
                self.cache.release(job.hashes, job.private)
                finished.append(job)
            else:
                self._join_decode(job)
        self._chunks = []
        return StepOutcome(first, handoffs, finished)

    def _admit(self) -> None:
        bs, limit, cache = self.block_size, self.profile.max_batch_size, self.cache
        while self.waiting and len(self.prefilling) + len(self.decoding) < limit:
            job = self.waiting[0]
            req = job.req
            prompt_blocks = -(-req.input_tokens // bs)
            out_blocks = -(-(req.input_tokens + req.output_tokens) // bs) - prompt_blocks if job.decode_here else 0
            hit = cache.lookup(job.hashes)
            new = prompt_blocks - hit + out_blocks
            if not cache.can_reserve(job.hashes[:hit], new):
                break  # the simulator never routes a request larger than the pool, so this frees up
            self.waiting.popleft()
            cache.reserve(job.hashes[:hit], new)
            job.hit, job.private, job.admitted = hit, new, True
            if job.todo_tokens:  # prefill here
                job.todo_tokens = max(1, req.input_tokens - hit * bs)
                req.cached_tokens = min(hit * bs, req.input_tokens)
                self.hit_blocks += hit
                self.lookup_blocks += len(job.hashes)
                self.prefilling.append(job)
            else:  # imported: the missing blocks arrived over the shuttle
                cache.commit(job.hashes[hit:])
                job.private -= len(job.hashes) - hit
                self._join_decode(job)

    def _join_decode(self, job: Job) -> None:
        job.end_step = self.step_idx + job.req.output_tokens - 1
        self.ctx_sum += job.req.input_tokens + 1
        heapq.heappush(self.decoding, (job.end_step, job.req.idx, job))
