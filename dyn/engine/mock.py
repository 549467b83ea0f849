"""The mock engine: the real Engine over a runner that models time, not math.

Blocks, hashes, prefix hits, preemption and events are exactly those of the
torch engine, since only the runner differs. The MockRunner

* writes each block a small payload derived from the block's index and
  tokens (as real KV depends on them), so transfers can be checked byte for
  byte;
* picks each next token from the payloads of every block of the context,
  so a wrong block id, a lost prefix or a corrupted import changes the
  output exactly as with a real model, while equal KV gives equal tokens;
  tokens are within the vocabulary and never EOS (requests end by length);
* reports a step time from `MockTiming` (dyn.config.recipe).

MockEngine runs on a live clock (step sleeps the modelled time, so a worker
behaves like a GPU) or a virtual one (no sleep; `virtual_time_s` advances,
for the simulator). No torch here.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Callable
from hashlib import blake2b
from typing import Literal

import numpy as np

from dyn.config.recipe import MockTiming
from dyn.engine.backend import TokenOutput
from dyn.engine.engine import Detokenize, Engine
from dyn.engine.host_memory import host_pool
from dyn.engine.runner import ModelRunner, SeqWork, StepResult
from dyn.errors import EngineError

ClockMode = Literal["live", "virtual"]
_M64 = (1 << 64) - 1
VECTOR_FROM_BLOCKS = 128
"""A context of more blocks than this is re-read with one numpy gather, multiply and sum (at 1,700
blocks: ~0.65 ms in plain ints, once per block of decode steps, 40 us a token); fewer, in plain
ints, cheaper there."""


class MockRunner(ModelRunner):
    """A ModelRunner over a bytearray pool of `payload_bytes` per block."""

    def __init__(self, timing: MockTiming | None = None, *, block_size: int = 16,
                 vocab_size: int = 32000, eos_token_ids: tuple[int, ...] = (2,),
                 max_context: int = 4096, num_blocks: int | None = None,
                 payload_bytes: int = 64) -> None:
        self.timing = timing or MockTiming()
        num_blocks = self.timing.num_kv_blocks if num_blocks is None else num_blocks
        if block_size < 1 or num_blocks < 1 or max_context < 2:
            raise EngineError(f"mock engine needs block_size >= 1 (got {block_size}), "
                              f"num_blocks >= 1 (got {num_blocks}), max_context >= 2 "
                              f"(got {max_context})")
        if payload_bytes < 8 or payload_bytes % 8:
            raise EngineError(f"mock payload_bytes must be a positive multiple of 8, "
                              f"got {payload_bytes}")
        if vocab_size <= len(set(eos_token_ids)):
            raise EngineError(f"mock vocab_size {vocab_size} leaves no non-EOS token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.block_bytes = payload_bytes
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_context = max_context
        self._pool = host_pool(num_blocks * payload_bytes)
        self._view = memoryview(self._pool)
        # Each block's first 8 bytes as a little-endian uint64 (what _pick_token mixes).
        if sys.byteorder != "little":
            raise EngineError("the mock engine reads its KV payloads as little-endian words; this host is not")
        self._u64 = self._view.cast("Q")
        self._words = np.frombuffer(self._pool, dtype="<u8")
        self._stride = payload_bytes // 8
        self._odd = np.arange(1, 2 * -(-max_context // block_size) + 1, 2, dtype=np.uint64)
        """Each block's weight in the mix, for the numpy read: 1, 3, 5, ..."""
        t = self.timing
        self._zero_time = not (t.prefill_base_s or t.prefill_s_per_token or t.decode_base_s
                               or t.decode_s_per_seq or t.decode_s_per_ctx_token)
        self._hashers: list = []
        """Block index -> a blake2b state keyed with that index's salt, copied per payload (a copy
        costs 60% of a keyed constructor; a decode step writes a payload per sequence)."""
        self._prefix_mix: dict[str, tuple[list[int], int, int]] = {}
        """request id -> (its block_ids list, blocks in context, sum over all but the last); see _pick_token."""

    def block_view(self, block_id: int) -> memoryview:
        start = block_id * self.block_bytes
        return self._view[start:start + self.block_bytes]

    def execute(self, work: list[SeqWork]) -> StepResult:
        sampled: dict[str, int] = {}
        bs, write, pick = self.block_size, self._write_payload, self._pick_token
        for item in work:
            tokens = item.all_token_ids
            if tokens is None:
                raise EngineError("MockRunner needs SeqWork.all_token_ids")
            start = item.start_pos
            end = start + len(item.token_ids)
            block_ids = item.block_ids
            for idx in range(start // bs, -(-end // bs)):
                write(block_ids[idx], idx, tokens[idx * bs:min(end, idx * bs + bs)])
            if item.sample:
                sampled[item.request_id] = pick(item, end)
        if len(self._prefix_mix) > 4 * len(work) + 64:  # finished requests' entries
            self._prefix_mix = {item.request_id: self._prefix_mix[item.request_id] for item in work
                                if item.request_id in self._prefix_mix}
        return StepResult(sampled, None, 0.0 if self._zero_time else self.step_time_s(work))

    def step_time_s(self, work: list[SeqWork]) -> float:
        """Modelled time of one step (see MockTiming); a mixed batch pays both parts."""
        t = self.timing
        if self._zero_time:
            return 0.0  # a zero-time mock (router benchmarks): no per-step accounting
        decodes = [w for w in work if len(w.token_ids) == 1 and w.num_generated > 0]
        num_prefill = sum(len(w.token_ids) for w in work) - len(decodes)
        duration = 0.0
        if num_prefill:
            duration += t.prefill_base_s + t.prefill_s_per_token * num_prefill
        if decodes:
            context = sum(w.start_pos + 1 for w in decodes)
            duration += (t.decode_base_s + t.decode_s_per_seq * len(decodes)
                         + t.decode_s_per_ctx_token * context)
        return duration

    def _write_payload(self, block_id: int, block_idx: int, tokens: list[int]) -> None:
        hashers = self._hashers
        while block_idx >= len(hashers):
            hashers.append(blake2b(digest_size=64, person=b"dyn-mock", salt=len(hashers).to_bytes(8, "little")))
        hasher = hashers[block_idx].copy()
        hasher.update(array("I", tokens))
        digest = hasher.digest()
        size = self.block_bytes
        start = block_id * size
        self._pool[start:start + size] = digest if size == 64 else (digest * (size // 64 + 1))[:size]

    def _pick_token(self, item: SeqWork, end: int) -> int:
        # sum(first word of block i * (2i + 1)) mod 2**64, in plain ints: for the ~30 blocks of a
        # typical context this costs a third of the numpy gather + multiply + sum it replaces.
        # The sum over the full blocks before the last is kept per request until the context
        # reaches a new block (then read again, so a block changed under a running request still
        # changes its tokens within one block of steps): a decode step reads one block, not all.
        words, stride = self._u64, self._stride
        block_ids = item.block_ids
        num_blocks = -(-end // self.block_size)
        cached = self._prefix_mix.get(item.request_id)
        if cached is not None and cached[0] is block_ids and cached[1] == num_blocks:
            mix = cached[2]
        elif num_blocks - 1 > VECTOR_FROM_BLOCKS:  # the same sum mod 2**64 (uint64 wraps)
            rows = np.array(block_ids[:num_blocks - 1], dtype=np.intp)
            rows *= stride
            mix = int((self._words[rows] * self._odd[:num_blocks - 1]).sum(dtype=np.uint64))
            self._prefix_mix[item.request_id] = (block_ids, num_blocks, mix)
        else:
            mix, weight = 0, 1
            for block_id in block_ids[:num_blocks - 1]:
                mix += words[block_id * stride] * weight
                weight += 2
            self._prefix_mix[item.request_id] = (block_ids, num_blocks, mix)
        mix += words[block_ids[num_blocks - 1] * stride] * (2 * num_blocks - 1)
        mix &= _M64
        mix ^= end * 0x9E3779B97F4A7C15
        if item.sampling.temperature > 0 and item.sampling.seed is not None:
            mix ^= (item.sampling.seed + 1) * 0xD1B54A32D192ED03
        token = _splitmix64(mix & _M64) % self.vocab_size
        while token in self.eos_token_ids:
            token = (token + 1) % self.vocab_size
        return token


class MockEngine(Engine):
    """Engine(MockRunner) with a live or virtual clock."""

    steps_in_interpreter = True

    def __init__(self, timing: MockTiming | None = None, *, block_size: int = 16,
                 vocab_size: int = 32000, eos_token_ids: tuple[int, ...] = (2,),
                 max_context: int = 4096, num_blocks: int | None = None,
                 max_batch_size: int = 64, max_num_batched_tokens: int = 2048,
                 clock: ClockMode = "live", detokenize: Detokenize | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if clock not in ("live", "virtual"):
            raise EngineError(f"mock clock must be 'live' or 'virtual', got {clock!r}")
        runner = MockRunner(timing, block_size=block_size, vocab_size=vocab_size,
                            eos_token_ids=eos_token_ids, max_context=max_context,
                            num_blocks=num_blocks)
        self.clock_mode: ClockMode = clock
        self.virtual_time_s = 0.0
        """Sum of modelled step times (both clocks)."""
        self._sleep = sleep
        self.pace_inline = False
        """Set by a loop that steps this engine on an event loop (dyn.worker.inline_loop): a live
        step then returns at once and leaves its modelled time still to pass in `step_left_s`,
        for the loop to wait without blocking, instead of sleeping it."""
        self.step_left_s = 0.0
        now = time.monotonic if clock == "live" else (lambda: self.virtual_time_s)
        super().__init__(runner, max_batch_size=max_batch_size,
                         max_num_batched_tokens=max_num_batched_tokens,
                         detokenize=detokenize, clock=now)

    def step(self) -> list[TokenOutput]:
        started = time.perf_counter()
        outputs = super().step()
        self.virtual_time_s += self.last_step_duration_s
        self.step_left_s = 0.0
        if self.clock_mode == "live" and self.last_step_duration_s > 0:
            left = self.last_step_duration_s - (time.perf_counter() - started)
            if left > 0:
                if self.pace_inline:
                    self.step_left_s = left
                else:
                    self._sleep(left)
        return outputs


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)
