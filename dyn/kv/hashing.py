"""Block hashes: the one name of a block of KV content, everywhere.

A prompt is cut into blocks of `block_size` tokens; only FULL blocks get a
hash (a partial last block is never cached or shared). A block's hash chains
its parent's hash, its own tokens and a salt (tenant, later adapters), so a
hash names the whole prefix up to and including that block.

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes:   h0=H(root,salt,blk0)  h1=H(h0,salt,blk1)   (partial: none)

Encoding (stable across processes, machines and Python versions; no
`hash()`): blake2b, 8-byte digest, personalised with `dyn-kv-1`, over

    flag:u8 (0 = root, 1 = has parent) | parent:u64le | salt:u64le | tokens:u32le*

The digest is read little-endian and its top bit cleared: every hash is an
int in [0, 2**63), so msgpack, numpy int64 and SQLite carry it as a signed
64-bit integer without surprises.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

from dyn.errors import RequestError

HASH_BITS = 63
HASH_MASK = (1 << HASH_BITS) - 1
_U64 = (1 << 64) - 1
_PERSON = b"dyn-kv-1"
_HEADER = struct.Struct("<BQQ")


def hash_block(parent: int | None, tokens: Sequence[int], salt: int = 0) -> int:
    """Hash of one block given its parent's hash (None for the first block)."""
    return _digest(_header(parent, salt), _pack(tokens))


def hash_blocks(token_ids: Sequence[int], block_size: int, salt: int = 0,
                parent: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids` (the tail remainder is ignored).

    `parent` continues an existing chain: hashing the tokens after a known
    prefix whose last full block hashed to `parent`.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise RequestError(f"block_size must be a positive int, got {block_size!r}",
                           field="block_size")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    packed = memoryview(_pack(token_ids[: num_blocks * block_size]))
    step = 4 * block_size
    header = _header(parent, salt)  # validates parent and salt once
    pack, from_bytes = _HEADER.pack, int.from_bytes
    hashes: list[int] = []
    for start in range(0, num_blocks * step, step):
        h = blake2b(header, digest_size=8, person=_PERSON)
        h.update(packed[start:start + step])
        value = from_bytes(h.digest(), "little") & HASH_MASK
        hashes.append(value)
        header = pack(1, value, salt)
    return hashes


class BlockHashCache:
    """`hash_blocks` with a memory of blocks already hashed after the same parent.

    Traffic repeats long prefixes (system prompts, conversation history): a block
    seen before under the same parent and salt is a dict lookup on its 4*block_size
    bytes instead of a blake2b (about a fifth of the cost per block). The result is
    the same as hash_blocks' by construction (the key is all the hash's input);
    the memory is cleared when it holds `max_entries` blocks.
    """

    def __init__(self, max_entries: int = 1 << 15) -> None:
        self._memo: dict[tuple[int, int, bytes], int] = {}
        self._max_entries = max_entries

    def hash_blocks(self, token_ids: Sequence[int], block_size: int, salt: int = 0) -> list[int]:
        if not isinstance(block_size, int) or block_size < 1:
            return hash_blocks(token_ids, block_size, salt)  # raises the same RequestError
        num_blocks = len(token_ids) // block_size
        if num_blocks == 0:
            return []
        root = _header(None, salt)  # validates salt
        packed = _pack(token_ids[: num_blocks * block_size])
        step = 4 * block_size
        memo, pack, from_bytes = self._memo, _HEADER.pack, int.from_bytes
        parent = -1
        hashes: list[int] = []
        for start in range(0, num_blocks * step, step):
            key = (parent, salt, packed[start:start + step])
            value = memo.get(key)
            if value is None:
                h = blake2b(root if parent < 0 else pack(1, parent, salt), digest_size=8, person=_PERSON)
                h.update(key[2])
                value = from_bytes(h.digest(), "little") & HASH_MASK
                if len(memo) >= self._max_entries:
                    memo.clear()
                memo[key] = value
            hashes.append(value)
            parent = value
        return hashes


def _header(parent: int | None, salt: int) -> bytes:
    if not isinstance(salt, int) or not 0 <= salt <= _U64:
        raise RequestError(f"salt must be an int in [0, 2**64), got {salt!r}", field="salt")
    if parent is None:
        return _HEADER.pack(0, 0, salt)
    if not isinstance(parent, int) or not 0 <= parent <= _U64:
        raise RequestError(f"parent hash must be an int in [0, 2**64), got {parent!r}",
                           field="parent")
    return _HEADER.pack(1, parent, salt)


def _pack(tokens: Sequence[int]) -> bytes:
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        bad = next((i for i, t in enumerate(tokens)
                    if not isinstance(t, int) or not 0 <= t < 2**32), None)
        where = f" (index {bad}: {tokens[bad]!r})" if bad is not None else ""
        raise RequestError(f"token ids must be ints in [0, 2**32){where}: {exc}",
                           field="token_ids") from None
    if arr.itemsize != 4:  # pragma: no cover - exotic platforms
        return struct.pack(f"<{len(arr)}I", *arr)
    if sys.byteorder == "big":  # pragma: no cover - hashes must match x86/ARM hosts
        arr.byteswap()
    return arr.tobytes()


def _digest(header: bytes, payload: bytes | memoryview) -> int:
    h = blake2b(header, digest_size=8, person=_PERSON)
    h.update(payload)
    return int.from_bytes(h.digest(), "little") & HASH_MASK
