"""Trace records -> simulated requests with real block hashes at the recipe's block size.

Mooncake hash ids name 512-token blocks and chain (an id always follows the
same parent), so each id maps to one fixed run of tokens (dyn.bench.synth)
and its sub-blocks of `block_size` tokens hash with dyn.kv.hashing, chained
from the previous id's last hash. Equal leading ids give equal leading
hashes, exactly as the live system would compute from the same prompts.
Traces without ids (Azure) get unique hash chains per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dyn.bench.synth import PromptSynthesizer
from dyn.bench.trace import MOONCAKE_BLOCK_TOKENS, Trace, iter_mooncake
from dyn.kv.hashing import hash_block, hash_blocks
from dyn.sim.errors import SimError


@dataclass(slots=True)
class SimRequest:
    idx: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: list[int]
    """Chained hashes of the prompt's full blocks."""
    first_token_s: float | None = None
    finish_s: float | None = None
    cached_tokens: int = 0
    """Prompt tokens found in the prefilling worker's cache."""
    prefill_worker: str | None = None
    decode_worker: str | None = None
    error: str | None = None
    retries: int = 0
    notes: dict = field(default_factory=dict)


def build_requests(trace: Trace, block_size: int, *, max_requests: int | None = None,
                   seed: int = 0, time_scale: float = 1.0) -> list[SimRequest]:
    """Simulated requests for `trace` (arrivals divided by `time_scale`)."""
    if block_size < 1:
        raise SimError(f"must be >= 1, got {block_size}", field="block_size")
    if time_scale <= 0:
        raise SimError(f"must be > 0, got {time_scale}", field="time_scale")
    records = trace.requests[:max_requests] if max_requests else trace.requests
    chunk = trace.block_tokens
    if chunk and chunk % block_size:
        raise SimError(f"the trace's {chunk}-token blocks are not a multiple of the recipe's "
                       f"block_size {block_size}", field="model.block_size")
    synth = PromptSynthesizer(chunk or block_size, chunk or block_size, seed=seed, max_cached_blocks=1)
    by_id: dict[int, list[int]] = {}
    out: list[SimRequest] = []
    for idx, record in enumerate(records):
        num_blocks = record.input_length // block_size
        if record.hash_ids:
            hashes: list[int] = []
            parent: int | None = None
            for hash_id in record.hash_ids:
                if len(hashes) >= num_blocks:
                    break
                sub = by_id.get(hash_id)
                if sub is None:
                    sub = hash_blocks(synth.block(hash_id), block_size, parent=parent)
                    by_id[hash_id] = sub
                hashes.extend(sub)
                parent = sub[-1]
            del hashes[num_blocks:]
        else:
            hashes = _unique_chain(seed, idx, num_blocks)
        out.append(SimRequest(idx, record.arrival_s / time_scale, record.input_length,
                              max(1, record.output_length), hashes))
    return out


def stream_requests(path: str | Path, block_size: int, *, max_requests: int | None = None,
                    seed: int = 0, time_scale: float = 1.0) -> Iterator[SimRequest]:
    """A Mooncake trace as simulated requests, read one at a time (a 1M-request day in
    constant memory, and no token synthesis or hashing per block).

    Block names come from the ids: sub-block j of id h is h * (512 / block_size) + j. A
    Mooncake id always follows the same parent, so two prompts share a name exactly when they
    share the prefix up to it: caches, KV events and the router see the same equalities as
    with `build_requests`' token hashes, under other integers.
    """
    if block_size < 1 or MOONCAKE_BLOCK_TOKENS % block_size:
        raise SimError(f"must divide the trace's {MOONCAKE_BLOCK_TOKENS}-token blocks, got {block_size}",
                       field="block_size")
    if time_scale <= 0:
        raise SimError(f"must be > 0, got {time_scale}", field="time_scale")
    per = MOONCAKE_BLOCK_TOKENS // block_size
    subs = range(per)
    for idx, record in enumerate(iter_mooncake(path, max_requests)):
        num_blocks = record.input_length // block_size
        if not record.hash_ids:
            hashes = _unique_chain(seed, idx, num_blocks)
        elif per == 1:
            hashes = list(record.hash_ids[:num_blocks])
        else:
            hashes = [h * per + j for h in record.hash_ids for j in subs]
            del hashes[num_blocks:]
        yield SimRequest(idx, record.arrival_s / time_scale, record.input_length,
                         max(1, record.output_length), hashes)


def _unique_chain(seed: int, idx: int, num_blocks: int) -> list[int]:
    hashes: list[int] = []
    parent = None
    for block in range(num_blocks):
        parent = hash_block(parent, (seed, idx, block))
        hashes.append(parent)
    return hashes
