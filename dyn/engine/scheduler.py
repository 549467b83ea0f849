"""Continuous batching: who runs how many tokens this step, and in which blocks.

Every step walks all live sequences in one order: higher priority first,
then earlier arrival. Each gets a chunk of `all_token_ids[num_computed:]`
under a per-step token budget (chunked prefill); one token is held back for
every decode further down the order, so a long prefill never stalls decodes.

    budget 8, order A(decode) B(prefill, 20 left) C(decode) D(waiting)
    A: 1 token | B: 8-1-1 = 6 tokens (1 kept for C) | C: 1 token | D: none left

When a sequence needs a block and the pool is full, the sequence latest in
the order is preempted by recompute (blocks freed, progress reset, back to
waiting); if that is the sequence itself, it waits. A waiting sequence may
only preempt running sequences of strictly lower priority. A waiting
sequence that holds blocks (an imported prompt not yet started) gives them
up to any sequence before it in the order: otherwise imports that each wait
for one more block, holding the blocks the others need, stall forever. New sequences
reuse cached prefix blocks and, through the tier hooks, blocks offloaded to
a lower tier, and are only charged for the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from operator import attrgetter
from typing import NamedTuple

from dyn.engine.block_manager import BlockManager
from dyn.engine.sequence import Sequence, SequenceStatus

TierProbe = Callable[[Seq[int]], int]
"""Number of leading hashes a lower tier holds."""
TierFetch = Callable[[Seq[int], Seq[int]], int]
"""(hashes, block_ids) -> number of leading blocks fetched into the pool."""


_ORDER = attrgetter("order")


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_tokens: int
    sample: bool


class Scheduler:
    """Owns the waiting and running queues and every block allocation."""

    def __init__(self, block_manager: BlockManager, *, max_batch_size: int,
                 max_num_batched_tokens: int, tier_probe: TierProbe | None = None,
                 tier_fetch: TierFetch | None = None) -> None:
        assert max_batch_size >= 1 and max_num_batched_tokens >= 1
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tier_probe = tier_probe
        self.tier_fetch = tier_fetch
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_blocks = 0
        self.prefix_lookup_blocks = 0
        self.num_tier_hit_blocks = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """Pick this step's work; allocates blocks and may preempt."""
        if not self.waiting:
            batch = self._schedule_decodes()
            if batch is not None:
                return batch
        budget = self.max_num_batched_tokens
        running_status, bs = SequenceStatus.RUNNING, self.block_size
        running = self.running
        reserved = sum(1 for s in running if len(s.all_token_ids) - s.num_computed == 1)
        preempted: set[int] = set()
        waiting_blocked = False
        batch: list[ScheduledSeq] = []
        # (The order is by (-priority, arrival); a decode step of every running sequence, the
        # common case, touches only plain attributes: this loop runs once per sequence per step.)
        for seq in sorted(running + self.waiting, key=_ORDER):
            if budget <= 0:
                break
            if id(seq) in preempted:
                continue
            is_running = seq.status is running_status
            num_uncomputed = len(seq.all_token_ids) - seq.num_computed
            is_decode = is_running and num_uncomputed == 1
            if is_decode:
                reserved -= 1
            avail = budget if is_decode else budget - reserved
            if avail <= 0:
                continue
            if is_running:
                num = min(num_uncomputed, avail)
                if (-(-(seq.num_computed + num) // bs) > len(seq.block_ids)
                        and not self._grow(seq, num, preempted, victims_below=None)):
                    continue
            else:
                if waiting_blocked or len(running) >= self.max_batch_size:
                    continue
                num = self._admit(seq, avail, preempted)
                if num == 0:
                    waiting_blocked = True
                    continue
            batch.append(ScheduledSeq(seq, num, seq.num_computed + num == len(seq.all_token_ids)))
            budget -= num
        return batch

    def _schedule_decodes(self) -> list[ScheduledSeq] | None:
        """The common step, when nothing waits: every running sequence decodes one token and the
        pool has the blocks they need. The same batch (and the same block ids, allocated in the
        same order) as the general pass in schedule(), without its per-sequence bookkeeping;
        None when that pass is needed (a prefill chunk, the token budget, a pool too full)."""
        running = self.running
        if len(running) > self.max_num_batched_tokens:
            return None
        bs = self.block_size
        ordered = sorted(running, key=_ORDER) if len(running) > 1 else running
        needed = 0
        for seq in ordered:
            num_computed = seq.num_computed
            if len(seq.all_token_ids) - num_computed != 1:
                return None
            needed += num_computed // bs + 1 > len(seq.block_ids)  # (the next token starts a new block)
        if needed and not self.blocks.can_allocate(needed):
            return None
        batch = []
        for seq in ordered:
            if seq.num_computed // bs + 1 > len(seq.block_ids):
                seq.block_ids.extend(self.blocks.allocate(1))
            batch.append(ScheduledSeq(seq, 1, True))
        return batch

    def advance(self, seq: Sequence, num_tokens: int) -> None:
        """The runner computed `num_tokens` more of `seq`: cache its newly full blocks."""
        seq.num_computed += num_tokens
        if seq.num_computed // self.block_size > seq.num_registered_blocks:  # (most decode steps: none)
            self.register_computed(seq)

    def register_computed(self, seq: Sequence) -> None:
        full = min(seq.num_computed // self.block_size, len(seq.block_hashes))
        start = seq.num_registered_blocks
        if full > start:
            # Blocks [start, kept) carry the request's retention, the rest the default.
            kept = min(max(seq.num_retained_blocks, start), full)
            for lo, hi, retention in ((start, kept, seq.request.retention), (kept, full, None)):
                if hi > lo:
                    parent = seq.block_hashes[lo - 1] if lo else None
                    self.blocks.cache_blocks(seq.block_ids[lo:hi], seq.block_hashes[lo:hi],
                                             parent, retention)
            seq.num_registered_blocks = full

    def remove(self, seq: Sequence, *, keep_blocks: bool = False) -> None:
        """Take `seq` out of the queues (finish or abort); free its blocks unless kept."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.release_blocks(seq)

    def release_blocks(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_ids)
        seq.block_ids = []

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def _grow(self, seq: Sequence, num: int, preempted: set[int],
              victims_below: int | None) -> bool:
        """Give `seq` the blocks for `num` more tokens, preempting later sequences if needed."""
        needed = self.blocks_needed(seq, num)
        if not self._make_room(seq, needed, preempted, victims_below):
            return False
        seq.block_ids.extend(self.blocks.allocate(needed))
        return True

    def _admit(self, seq: Sequence, avail: int, preempted: set[int]) -> int:
        """Start a waiting sequence: prefix hits, tier fetches, first chunk. 0 if it can't fit."""
        bs = self.block_size
        if seq.block_ids:  # imported: its prompt blocks are already held
            num = min(seq.num_uncomputed, avail)
            if not self._grow(seq, num, preempted, victims_below=seq.priority):
                return 0
            self._start(seq)
            return num
        matchable = [] if seq.needs_prompt_scores else seq.block_hashes[:(seq.num_tokens - 1) // bs]
        hit = self.blocks.match_prefix(matchable)
        num_tier = self.tier_probe(matchable[len(hit):]) if self.tier_probe else 0
        num_cached = (len(hit) + num_tier) * bs
        num = min(seq.num_tokens - num_cached, avail)
        num_new = -(-(num_cached + num) // bs) - len(hit)
        if not self._make_room(seq, num_new, preempted, seq.priority, hits=hit):
            return 0
        self.blocks.lock(hit)
        if seq.request.retention is not None:
            self.blocks.retain(hit[:seq.num_retained_blocks], seq.request.retention)
        new_ids = self.blocks.allocate(num_new)
        seq.block_ids = hit + new_ids
        num_fetched = 0
        if num_tier:
            assert self.tier_fetch is not None
            tier_hashes = matchable[len(hit):len(hit) + num_tier]
            num_fetched = self.tier_fetch(tier_hashes, new_ids[:num_tier])
        self.prefix_lookup_blocks += len(matchable)
        self.prefix_hit_blocks += len(hit)
        self.num_tier_hit_blocks += num_fetched
        seq.num_computed = (len(hit) + num_fetched) * bs
        seq.num_registered_blocks = len(hit)
        self.register_computed(seq)
        if seq.is_first_output:
            seq.num_cached_tokens = min(seq.num_computed, seq.num_prompt_tokens)
        self._start(seq)
        # A failed fetch moves the chunk start back; the blocks already cover it.
        return min(seq.num_uncomputed, avail)

    def _start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING

    def _make_room(self, seq: Sequence, needed: int, preempted: set[int],
                   victims_below: int | None, hits: Seq[int] = ()) -> bool:
        """Preempt running sequences after `seq` in the order until `needed` blocks are free.

        `victims_below`: only preempt sequences of priority strictly lower
        (for admissions). A running `seq` that still can't fit preempts itself.
        `hits`: cached blocks `seq` is about to lock. Those free now leave the
        free count when locked, so they count against the room, and a victim
        that shared them frees them into that count: recounted per victim.
        """
        ref_count = self.blocks.ref_count
        while not self.blocks.can_allocate(needed + sum(1 for b in hits if ref_count(b) == 0)):
            victim = self._pick_victim(seq, victims_below)
            if victim is None:
                if seq.status is SequenceStatus.RUNNING:
                    self._preempt(seq, preempted)
                return False
            self._preempt(victim, preempted)
        return True

    def _pick_victim(self, seq: Sequence, victims_below: int | None) -> Sequence | None:
        """The latest in the order of: running sequences after `seq` (of priority below
        `victims_below`, if given) and waiting ones after `seq` that hold blocks (imports)."""
        key = seq.sort_key()
        candidates = [s for s in self.running if s is not seq and s.sort_key() > key
                      and (victims_below is None or s.priority < victims_below)]
        candidates += [s for s in self.waiting if s.block_ids and s is not seq and s.sort_key() > key]
        return max(candidates, key=Sequence.sort_key, default=None)

    def _preempt(self, seq: Sequence, preempted: set[int]) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.waiting.append(seq)
        self.release_blocks(seq)
        seq.reset_for_recompute()
        preempted.add(id(seq))
        self.num_preemptions += 1
